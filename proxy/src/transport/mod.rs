//! The data plane's transport: QUIC between proxies, one connection per pair of proxies,
//! reused by every request, authenticated by overlay identity and network key ([`auth`])
//! before any request is served. quinn-proto's state machine runs under one driver task per
//! endpoint ([`driver`]), which owns the socket and every connection. Datagrams grow to what
//! the path carries (path MTU discovery up to 64 KiB, GSO batches kept within what the
//! kernel takes, on a socket the runtime watches for reading only: `udp`), and a peer
//! acknowledges every tenth packet rather than every second (the ACK-frequency extension).

pub mod auth;
pub mod driver;
mod tls;
mod udp;

pub use driver::{Connection, RecvStream, SendStream};

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::Duration,
};

use libp2p::{PeerId, identity::Keypair};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};

use auth::{AuthError, EXPORTER_LABEL, KEYING_MATERIAL_BYTES, MAX_PROOF_BYTES, Proof, Role};
use driver::{Connecting, Endpoint};

/// How long the proof exchange after the TLS handshake may take.
const AUTH_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection that hears nothing from its peer for this long is closed. Keep-alives (below)
/// keep live connections open; a peer that died is noticed within this, and the requests
/// waiting on it fail and are retried elsewhere.
const MAX_IDLE: Duration = Duration::from_secs(4);
const KEEP_ALIVE: Duration = Duration::from_secs(1);
/// The largest UDP payload this proxy receives and path MTU discovery searches up to: what
/// loopback and jumbo-frame LANs carry. Discovery finds what the path really takes (an
/// Ethernet path stays near 1.4 KB, loopback goes to 64 KiB); fewer, larger datagrams cut
/// the per-packet work (assembly, encryption, acknowledgement) that bounds streaming.
const MAX_UDP_PAYLOAD: u16 = 65527;
/// Ack-eliciting packets a peer may receive before it must acknowledge (the ACK-frequency
/// extension, which both ends of our connections speak): one ACK per ten packets under
/// streaming instead of one per two. Requests and responses carry their ACKs with them.
const ACK_ELICITING_THRESHOLD: u32 = 10;
/// Flow-control windows, sized from the bandwidth-delay product of the paths this runs on
/// rather than quinn's defaults (10 MB in flight per connection, unbounded receive): 1 Gbit/s
/// at 16 ms (an edge to its regional cloud) is 2 MB. A stream may have that much unread at
/// its receiver, a connection twice that, and a sender keeps at most that much unacknowledged;
/// this bounds what a slow reader at either end can make a proxy hold.
pub(crate) const STREAM_WINDOW: u32 = 2 << 20;
const CONNECTION_WINDOW: u32 = 4 << 20;
const SEND_WINDOW: u64 = 2 << 20;
/// How long a peer may delay an acknowledgement (quinn's default `max_ack_delay`).
const ACK_DELAY: Duration = Duration::from_millis(25);
/// [`Transport::check_silence`] waits at least this for an acknowledgement: a loaded machine
/// delays even a QUIC stack's answers by tens of milliseconds.
pub const MIN_SILENCE: Duration = Duration::from_millis(100);
/// Bytes of unreliable datagrams received and not yet read, per connection: the UDP datagrams
/// of layer-4 tunnels ([`crate::l4::datagrams`], read by one task per connection) and the
/// empty ones [`Transport::check_silence`] sends to elicit acknowledgements. Past it the oldest
/// are dropped, as a full UDP socket buffer would.
const DATAGRAM_BUFFER: usize = 1 << 20;
/// Application close codes.
const CLOSE_AUTH_FAILED: u32 = 1;
const CLOSE_DEAD: u32 = 2;

/// What [`Transport::check_silence`] found on the connection to a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Silence {
    /// Its QUIC stack acknowledged something: it is alive, however busy its proxy is.
    Heard,
    /// Nothing came back within a round trip and the ACK delay, or the connection closed.
    Silent,
    /// No connection is open to it (none was made, or it closed): nothing to judge.
    Unconnected,
}

/// Why the endpoint could not be set up, or a connection with a peer not made or not
/// authenticated.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The endpoint could not be made (the UDP socket, the TLS configuration, no Tokio
    /// runtime), or the task of an inbound handshake failed; holds the reason as text.
    #[error("cannot set up QUIC: {0}")]
    Setup(String),
    /// The QUIC handshake with a peer, dialled or inbound, did not complete.
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// The peer's UDP address.
        addr: SocketAddr,
        /// quinn's error, as text.
        reason: String,
    },
    /// The peer's proof did not verify: malformed, another peer than the one dialled, a wrong
    /// network key or signature.
    #[error("authentication with {addr} failed: {source}")]
    Auth {
        /// The peer's UDP address.
        addr: SocketAddr,
        /// What was wrong with the proof.
        source: AuthError,
    },
    /// The proof exchange after the TLS handshake took longer than 5 s.
    #[error("{addr} did not authenticate within {AUTH_TIMEOUT:?}")]
    AuthTimeout {
        /// The peer's UDP address.
        addr: SocketAddr,
    },
    /// The TLS session gave no keying material for the proofs to sign.
    #[error("the TLS session with {addr} exports no keying material to prove identities on")]
    KeyingMaterial {
        /// The peer's UDP address.
        addr: SocketAddr,
    },
    /// The stream the proofs cross on failed (the connection was lost or reset, or a proof was
    /// longer than allowed).
    #[error("connection to {addr} failed during authentication: {reason}")]
    Stream {
        /// The peer's UDP address.
        addr: SocketAddr,
        /// quinn's error, as text.
        reason: String,
    },
}

/// This proxy's QUIC endpoint: listens for other proxies and connects to them.
pub struct Transport {
    endpoint: Endpoint,
    credentials: Arc<Credentials>,
    /// Handshakes of inbound connections under way, each in a task of its own so that a slow
    /// or abandoned one never holds up the next (a thawed peer may find dozens queued).
    handshakes: tokio::sync::Mutex<tokio::task::JoinSet<Accepted>>,
    /// Authenticated connections by peer. Read on every request, written on (re)connect.
    connections: RwLock<HashMap<PeerId, Connection>>,
    /// Serialises connecting to one peer, so concurrent requests share one new connection.
    connecting: tokio::sync::Mutex<HashMap<PeerId, Arc<tokio::sync::Mutex<()>>>>,
    /// Told of every peer that closes a connection this proxy dialled ([`Transport::watch_closes`]).
    closes: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedSender<PeerId>>>,
}

fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut config = quinn::TransportConfig::default();
    config
        .max_idle_timeout(Some(
            MAX_IDLE.try_into().expect("4 s is a valid idle timeout"),
        ))
        .keep_alive_interval(Some(KEEP_ALIVE))
        .max_concurrent_bidi_streams(1024u32.into())
        .datagram_receive_buffer_size(Some(DATAGRAM_BUFFER))
        .stream_receive_window(STREAM_WINDOW.into())
        .receive_window(CONNECTION_WINDOW.into())
        .send_window(SEND_WINDOW);
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD);
    config.mtu_discovery_config(Some(mtu));
    let mut acks = quinn::AckFrequencyConfig::default();
    acks.ack_eliciting_threshold(ACK_ELICITING_THRESHOLD.into());
    config.ack_frequency_config(Some(acks));
    Arc::new(config)
}

/// Kernel buffer asked for each direction of the UDP socket; Linux caps it at
/// `net.core.rmem_max` / `wmem_max`.
const SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// Asks for socket buffers that hold bursts of datagrams: Linux's default (208 KiB) queues
/// only a few 64 KiB ones, or about 170 small ones (9 ms at 20,000 a second). Best effort: a
/// kernel that refuses keeps its default. For the QUIC endpoint and the layer-4 tunnels'
/// UDP sockets.
pub fn size_socket_buffers(socket: &impl std::os::fd::AsFd) {
    let socket = socket2::SockRef::from(socket);
    for (direction, sized) in [
        ("receive", socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES)),
        ("send", socket.set_send_buffer_size(SOCKET_BUFFER_BYTES)),
    ] {
        if let Err(error) = sized {
            tracing::debug!(%error, direction, "cannot size a UDP socket buffer");
        }
    }
}

fn cannot_listen(addr: SocketAddr, error: std::io::Error) -> TransportError {
    TransportError::Setup(format!("cannot listen on {addr} (UDP): {error}"))
}

/// The QUIC configurations of a serving and a dialling side: our TLS and transport settings.
fn quic_configs() -> Result<(quinn::ServerConfig, quinn::ClientConfig), TransportError> {
    let setup = |e: &dyn std::fmt::Display| TransportError::Setup(e.to_string());
    let server_crypto = QuicServerConfig::try_from(tls::server_config().map_err(|e| setup(&e))?)
        .map_err(|e| setup(&e))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
    server.transport_config(transport_config());
    let client_crypto = QuicClientConfig::try_from(tls::client_config().map_err(|e| setup(&e))?)
        .map_err(|e| setup(&e))?;
    let mut client = quinn::ClientConfig::new(Arc::new(client_crypto));
    client.transport_config(transport_config());
    Ok((server, client))
}

fn endpoint_config() -> quinn::EndpointConfig {
    let mut config = quinn::EndpointConfig::default();
    config
        .max_udp_payload_size(MAX_UDP_PAYLOAD)
        .expect("65527 is QUIC's largest UDP payload");
    config
}

/// Whether an endpoint accepts connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointRole {
    /// It accepts connections (a sidecar, which serves its service to ingresses) and opens
    /// them.
    Serve,
    /// It only opens connections (an ingress, an l4-proxy, a worker's dialing endpoint): a
    /// connection attempt from outside is refused before any handshake, so a proxy that
    /// serves nothing exposes nothing on its UDP port, whichever interface that is on.
    DialOnly,
}

impl Transport {
    /// Binds the endpoint on `addr` (UDP), accepting connections as well as opening them.
    /// `network_key` is the 32-byte pre-shared key of a private network, if any.
    pub fn bind(
        addr: SocketAddr,
        keypair: Keypair,
        network_key: Option<[u8; 32]>,
    ) -> Result<Self, TransportError> {
        let socket = std::net::UdpSocket::bind(addr).map_err(|e| cannot_listen(addr, e))?;
        Self::on_socket(socket, keypair, network_key, EndpointRole::Serve)
    }

    /// The endpoint on a UDP socket bound already (a worker's share of the data-plane port,
    /// [`crate::workers`]), accepting connections or not as `role` says; within a Tokio
    /// runtime, whose thread then drives it.
    pub fn on_socket(
        socket: std::net::UdpSocket,
        keypair: Keypair,
        network_key: Option<[u8; 32]>,
        role: EndpointRole,
    ) -> Result<Self, TransportError> {
        let setup = |e: &dyn std::fmt::Display| TransportError::Setup(e.to_string());
        let (server, client) = quic_configs()?;
        let addr = socket.local_addr().map_err(|e| setup(&e))?;
        let listen = |e: std::io::Error| cannot_listen(addr, e);
        size_socket_buffers(&socket);
        let socket = udp::Socket::new(socket).map_err(listen)?;
        let server = match role {
            EndpointRole::Serve => Some(server),
            EndpointRole::DialOnly => None,
        };
        let endpoint = Endpoint::new(endpoint_config(), server, client, socket);
        Ok(Self {
            endpoint,
            credentials: Arc::new(Credentials {
                keypair,
                network_key,
            }),
            handshakes: tokio::sync::Mutex::default(),
            connections: RwLock::default(),
            connecting: tokio::sync::Mutex::default(),
            closes: std::sync::Mutex::default(),
        })
    }

    /// The UDP address the endpoint is bound to (with the actual port when bound to port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// This proxy's overlay identity, which its proofs show to peers.
    pub fn peer_id(&self) -> PeerId {
        self.credentials.keypair.public().to_peer_id()
    }

    /// The authenticated connection to `peer` at `addr`: the open one if there is one, else a
    /// new one (concurrent callers share it).
    pub async fn connect(
        &self,
        peer: PeerId,
        addr: SocketAddr,
    ) -> Result<Connection, TransportError> {
        if let Some(connection) = self.open_connection(&peer) {
            return Ok(connection);
        }
        let lock = {
            let mut connecting = self.connecting.lock().await;
            Arc::clone(connecting.entry(peer).or_default())
        };
        let dialled = {
            let _guard = lock.lock().await;
            match self.open_connection(&peer) {
                Some(connection) => Ok(connection),
                None => self.dial(peer, addr).await.inspect(|connection| {
                    self.connections
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(peer, connection.clone());
                    self.watch(peer, connection);
                }),
            }
        };
        // The last of the callers that shared this dial takes its lock out of the map (the
        // map's and this caller's are the only references left): peers dialled once, or
        // never reached, leave nothing behind.
        let mut connecting = self.connecting.lock().await;
        if Arc::strong_count(&lock) == 2 {
            connecting.remove(&peer);
        }
        dialled
    }

    /// The peers that close connections this proxy dialled, as they do: a proxy that shuts
    /// down (stopped, or culled by its allocator) closes every connection at once, which is
    /// how an ingress learns it is gone without waiting for a timeout. One watcher; a second
    /// call replaces the first.
    pub fn watch_closes(&self) -> tokio::sync::mpsc::UnboundedReceiver<PeerId> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        *self.closes.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        rx
    }

    /// Tells the watcher, if any, when the peer closes `connection` (not when it times out or
    /// this side closes it).
    fn watch(&self, peer: PeerId, connection: &Connection) {
        let Some(tx) = self
            .closes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        else {
            return;
        };
        let connection = connection.clone();
        tokio::spawn(async move {
            match connection.closed().await {
                quinn::ConnectionError::ApplicationClosed(_)
                | quinn::ConnectionError::ConnectionClosed(_)
                | quinn::ConnectionError::Reset => {
                    let _ = tx.send(peer);
                }
                _ => {}
            }
        });
    }

    /// Closes the connection to `peer`, if there is one: it is declared dead or gone, and
    /// requests on it fail now rather than at the idle timeout. The next request connects
    /// anew.
    pub fn close_connection(&self, peer: &PeerId) {
        let removed = self
            .connections
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(peer);
        if let Some(connection) = removed {
            connection.close(CLOSE_DEAD.into(), b"declared dead");
        }
    }

    /// Whether the connection to `peer` is silent: its peer acknowledges nothing within twice
    /// the path RTT and its ACK delay (at least [`MIN_SILENCE`]) of an empty datagram sent
    /// now, which a live QUIC stack acknowledges however busy the proxy above it is. With no
    /// open connection there is nothing to judge ([`Silence::Unconnected`]): one may be being
    /// set up, or cannot be, which the attempts to set it up report.
    pub async fn check_silence(&self, peer: &PeerId) -> Silence {
        let Some(connection) = self.open_connection(peer) else {
            return Silence::Unconnected;
        };
        let heard = connection.stats().udp_rx.datagrams;
        // Any ack-eliciting frame would do; an empty datagram is the smallest quinn sends.
        // Should it not be sent, the peer's keep-alives and acknowledgements of whatever else
        // is under way still count.
        if let Err(error) = connection.send_datagram(bytes::Bytes::new()) {
            tracing::debug!(%peer, %error, "cannot send a datagram to check for silence");
        }
        let wait = (2 * connection.rtt() + ACK_DELAY).max(MIN_SILENCE);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = connection.closed() => return Silence::Silent,
        }
        if connection.stats().udp_rx.datagrams == heard {
            Silence::Silent
        } else {
            Silence::Heard
        }
    }

    /// The open connection to `peer`, if there is one (no waiting, no dialling).
    pub fn open_connection(&self, peer: &PeerId) -> Option<Connection> {
        let connections = self.connections.read().unwrap_or_else(|p| p.into_inner());
        connections
            .get(peer)
            .filter(|c| c.close_reason().is_none())
            .cloned()
    }

    async fn dial(&self, peer: PeerId, addr: SocketAddr) -> Result<Connection, TransportError> {
        let failed = |reason: String| TransportError::Connect { addr, reason };
        let connecting = self
            .endpoint
            .connect(addr, tls::SERVER_NAME)
            .map_err(|e| failed(e.to_string()))?;
        let connection = connecting.await.map_err(|e| failed(e.to_string()))?;
        let credentials = &self.credentials;
        let exchange = async {
            let material = keying_material(&connection, addr)?;
            let (mut send, mut recv) = connection
                .open_bi()
                .await
                .map_err(|e| stream_error(addr, &e))?;
            credentials
                .send_proof(&mut send, Role::Client, &material, addr)
                .await?;
            credentials
                .receive_proof(&mut recv, Some(peer), Role::Server, &material, addr)
                .await
        };
        authenticated(&connection, addr, exchange).await?;
        Ok(connection)
    }

    /// The next authenticated inbound connection and the peer on it. Handshakes run
    /// concurrently, each in a task of its own, so that a slow or abandoned one never holds
    /// up the next (a peer thawed after a freeze finds dozens of abandoned ones queued).
    /// Connections that fail to authenticate are closed without a word and reported as
    /// errors; `None` once the endpoint is closed.
    pub async fn accept(&self) -> Option<Accepted> {
        let mut handshakes = self.handshakes.lock().await;
        loop {
            tokio::select! {
                incoming = self.endpoint.accept() => {
                    let credentials = Arc::clone(&self.credentials);
                    handshakes.spawn(credentials.handshake(incoming?));
                }
                Some(done) = handshakes.join_next(), if !handshakes.is_empty() => {
                    return Some(done.unwrap_or_else(|e| {
                        Err(TransportError::Setup(format!("a handshake task failed: {e}")))
                    }));
                }
            }
        }
    }

    /// Resolves once every connection has closed (or gone idle).
    pub async fn wait_idle(&self) {
        self.endpoint.wait_idle().await;
    }

    /// Closes every connection and stops listening.
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"shutting down");
    }
}

/// An inbound connection, authenticated, and the peer on it; or why not.
pub type Accepted = Result<(PeerId, Connection), TransportError>;

/// Who this proxy is, for the proofs exchanged on every connection.
struct Credentials {
    keypair: Keypair,
    network_key: Option<[u8; 32]>,
}

impl Credentials {
    /// Completes an inbound connection: the QUIC handshake, then the proofs.
    async fn handshake(self: Arc<Self>, incoming: Connecting) -> Accepted {
        let addr = incoming.remote_address();
        let connection = incoming.await.map_err(|e| TransportError::Connect {
            addr,
            reason: e.to_string(),
        })?;
        let exchange = async {
            let material = keying_material(&connection, addr)?;
            let (mut send, mut recv) = connection
                .accept_bi()
                .await
                .map_err(|e| stream_error(addr, &e))?;
            let peer = self
                .receive_proof(&mut recv, None, Role::Client, &material, addr)
                .await?;
            // Only now does the server say who it is.
            self.send_proof(&mut send, Role::Server, &material, addr)
                .await?;
            Ok(peer)
        };
        authenticated(&connection, addr, exchange)
            .await
            .map(|peer| (peer, connection))
    }

    async fn send_proof(
        &self,
        send: &mut SendStream,
        role: Role,
        material: &[u8; KEYING_MATERIAL_BYTES],
        addr: SocketAddr,
    ) -> Result<(), TransportError> {
        let proof = Proof::new(&self.keypair, self.network_key.as_ref(), role, material);
        send.write_all(&proof.encode())
            .await
            .map_err(|e| stream_error(addr, &e))?;
        send.finish().map_err(|e| stream_error(addr, &e))
    }

    async fn receive_proof(
        &self,
        recv: &mut RecvStream,
        expected: Option<PeerId>,
        role: Role,
        material: &[u8; KEYING_MATERIAL_BYTES],
        addr: SocketAddr,
    ) -> Result<PeerId, TransportError> {
        let bytes = recv
            .read_to_end(MAX_PROOF_BYTES)
            .await
            .map_err(|e| stream_error(addr, &e))?;
        Proof::decode(&bytes)
            .and_then(|proof| proof.verify(expected, self.network_key.as_ref(), role, material))
            .map_err(|source| TransportError::Auth { addr, source })
    }
}

fn keying_material(
    connection: &Connection,
    addr: SocketAddr,
) -> Result<[u8; KEYING_MATERIAL_BYTES], TransportError> {
    let mut material = [0; KEYING_MATERIAL_BYTES];
    connection
        .export_keying_material(&mut material, EXPORTER_LABEL, b"")
        .map_err(|_| TransportError::KeyingMaterial { addr })?;
    Ok(material)
}

fn stream_error(addr: SocketAddr, error: &dyn std::fmt::Display) -> TransportError {
    TransportError::Stream {
        addr,
        reason: error.to_string(),
    }
}

/// Runs a proof exchange with its deadline; a connection that fails it is closed without
/// anything else being sent.
async fn authenticated<T>(
    connection: &Connection,
    addr: SocketAddr,
    exchange: impl std::future::Future<Output = Result<T, TransportError>>,
) -> Result<T, TransportError> {
    let result = tokio::time::timeout(AUTH_TIMEOUT, exchange)
        .await
        .unwrap_or(Err(TransportError::AuthTimeout { addr }));
    if result.is_err() {
        connection.close(CLOSE_AUTH_FAILED.into(), b"");
    }
    result
}

#[cfg(test)]
mod tests;
