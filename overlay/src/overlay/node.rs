//! The handle programs use: start a node, advertise and find namespaces, read RTTs, open
//! streams for the control protocols, shut down.

use std::{
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant},
};

use futures::{StreamExt, channel::mpsc as fmpsc, stream::BoxStream};
use libp2p::{Multiaddr, PeerId, identity::Keypair, kad::ProviderRecord, multiaddr::Protocol};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{
    behaviour::Behaviour,
    bootstrap::{BootstrapAddr, BootstrapPolicy, JoinError},
    connections::Connections,
    driver::{self, Command},
    providers,
    psk::NetworkKey,
    transport, withdraw,
};
use crate::rtt::{RttStats, RttTable, WindowShape};

/// Timers and lifetimes of the overlay; the defaults suit a real network, tests shorten them.
#[derive(Debug, Clone)]
pub struct Timing {
    /// How often every connection is pinged (RTT samples).
    pub ping_interval: Duration,
    /// A ping without answer for this long counts as failed.
    pub ping_timeout: Duration,
    /// Lifetime of a provider record at the nodes that store it; the provider republishes it
    /// every half of that. A provider that dies without withdrawing its records (killed) is
    /// forgotten at most this long afterwards.
    pub provider_ttl: Duration,
    /// How often kad refreshes the whole routing table (a query per bucket, each meeting
    /// peers over new connections). The Kademlia paper refreshes a bucket after an hour
    /// without a lookup through it; kad's default of five minutes was nine tenths of an
    /// idle node's CPU at 200 nodes (bench/ANALYSIS.md, "A thousand nodes"). Lookups find
    /// their way around stale contacts meanwhile, and dead ones leave the table when a
    /// query to them fails.
    pub routing_refresh: Duration,
    /// Limit on a connection's handshakes (pnet, noise, yamux). A peer with another network
    /// key often fails only by this timeout: pnet itself cannot tell a wrong key.
    pub handshake_timeout: Duration,
    /// Joining and reconnecting to bootstraps.
    pub bootstrap: BootstrapPolicy,
    /// Sliding window of the per-peer RTT histograms.
    pub rtt_window: WindowShape,
    /// A peer without an RTT sample for this long is dropped from the RTT table.
    pub peer_expiry: Duration,
    /// Deadline of one control-protocol request (open, send, answer).
    pub request_timeout: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            ping_interval: Duration::from_secs(5),
            ping_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            provider_ttl: Duration::from_secs(120),
            routing_refresh: Duration::from_secs(3600),
            bootstrap: BootstrapPolicy::default(),
            rtt_window: WindowShape::default(),
            peer_expiry: Duration::from_secs(600),
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// Everything a node needs to start.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// What this program is ("ping-monitor", "proxy", ...): sent in identify and node info.
    pub role: String,
    /// The node's key pair; its public key is the node's peer ID.
    pub keypair: Keypair,
    /// Addresses to listen on; `/ip4/0.0.0.0/tcp/0` picks any free port.
    pub listen: Vec<Multiaddr>,
    /// The nodes to join the overlay through. Empty for the first node of a network, which
    /// counts as joined as soon as it listens.
    pub bootstraps: Vec<BootstrapAddr>,
    /// Set for a private network: only peers with the same key can connect.
    pub network_key: Option<NetworkKey>,
    /// Whether this node answers DHT queries and stores records for others. Short-lived
    /// clients (hl-cli) set it to false so that others do not route through them.
    pub dht_server: bool,
    /// Where this node's data plane (a proxy's QUIC endpoint) listens, told to others in node
    /// info.
    pub data_plane: Option<std::net::SocketAddr>,
    /// Timers and lifetimes of the node.
    pub timing: Timing,
    /// Which connections the node keeps, and how many it holds ([`Connections`]).
    pub connections: Connections,
}

impl NodeConfig {
    /// A node with default timing that listens on a free port of every interface.
    pub fn new(role: impl Into<String>, keypair: Keypair) -> Self {
        Self {
            role: role.into(),
            keypair,
            listen: vec!["/ip4/0.0.0.0/tcp/0".parse().expect("valid multiaddr")],
            bootstraps: Vec::new(),
            network_key: None,
            dht_server: true,
            data_plane: None,
            timing: Timing::default(),
            connections: Connections::default(),
        }
    }
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listen address could not be bound (port in use, IP not on this machine, or an
    /// address the transport does not support).
    #[error("cannot listen on {}: {reason}", describe_listen_addr(addr))]
    Listen {
        /// The listen address that failed, from [`NodeConfig::listen`].
        addr: Multiaddr,
        /// Why, as the transport reported it.
        reason: String,
    },
    /// The transport could not be built: the noise configuration could not be made from the
    /// key pair. Holds the reason.
    #[error("cannot set up the transport: {0}")]
    Transport(String),
    /// No bootstrap could be reached in any round of dials.
    #[error(transparent)]
    Join(#[from] JoinError),
    /// The node's driver task ended before saying whether the node started (it panicked or
    /// was cancelled).
    #[error("the node stopped while starting")]
    Stopped,
}

/// `IP:PORT (multiaddr)` for TCP addresses, so the error names the value the way users
/// usually typed it.
fn describe_listen_addr(addr: &Multiaddr) -> String {
    let mut parts = addr.iter();
    match (parts.next(), parts.next()) {
        (Some(Protocol::Ip4(ip)), Some(Protocol::Tcp(port))) => format!("{ip}:{port} ({addr})"),
        (Some(Protocol::Ip6(ip)), Some(Protocol::Tcp(port))) => format!("[{ip}]:{port} ({addr})"),
        _ => addr.to_string(),
    }
}

/// A running overlay node. Cheap to clone; the node stops when [`Node::shutdown`] is called or
/// the last clone is dropped.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

struct Inner {
    peer_id: PeerId,
    role: String,
    network_key: Option<NetworkKey>,
    data_plane: Option<std::net::SocketAddr>,
    timing: Timing,
    commands: mpsc::Sender<Command>,
    streams: libp2p_stream::Control,
    rtt: Arc<RttTable>,
    /// Cancelled when the driver stops, for tasks serving the node's protocols.
    stopped: CancellationToken,
    driver: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Node {
    /// Starts listening, joins the overlay through the bootstraps (dialing all of them at once,
    /// retrying with backoff) and returns once at least one answered.
    pub async fn start(config: NodeConfig) -> Result<Node, StartError> {
        let peer_id = config.keypair.public().to_peer_id();
        let psk = config.network_key.as_ref().map(NetworkKey::pre_shared_key);
        let transport = transport::build(&config.keypair, psk, config.timing.handshake_timeout)
            .map_err(|e| StartError::Transport(e.to_string()))?;
        let behaviour = Behaviour::new(config.keypair.public(), &config);
        let mut swarm = libp2p::Swarm::new(
            transport,
            behaviour,
            peer_id,
            libp2p::swarm::Config::with_tokio_executor()
                // Connections to bootstraps, and a monitor's, are kept by keep streams.
                .with_idle_connection_timeout(config.connections.idle_timeout),
        );
        let streams = swarm.behaviour().streams.new_control();
        let rtt = Arc::new(RttTable::new(config.timing.rtt_window));

        let mut listeners = Vec::new();
        for addr in &config.listen {
            let id = swarm
                .listen_on(addr.clone())
                .map_err(|e| StartError::Listen {
                    addr: addr.clone(),
                    reason: driver::transport_error_text(&e),
                })?;
            listeners.push((id, addr.clone()));
        }

        let (commands, command_rx) = mpsc::channel(64);
        let (started_tx, started_rx) = oneshot::channel();
        let stopped = CancellationToken::new();
        let handle = tokio::spawn(driver::run(
            stopped.clone(),
            driver::Driver::new(
                swarm,
                &config,
                Arc::clone(&rtt),
                listeners,
                command_rx,
                commands.downgrade(),
                started_tx,
            ),
        ));
        match started_rx.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                let _ = handle.await;
                return Err(error);
            }
            Err(_) => return Err(StartError::Stopped),
        }
        let node = Node {
            inner: Arc::new(Inner {
                peer_id,
                role: config.role,
                network_key: config.network_key,
                data_plane: config.data_plane,
                timing: config.timing,
                commands,
                streams,
                rtt,
                stopped,
                driver: Mutex::new(Some(handle)),
            }),
        };
        withdraw::serve(&node);
        providers::serve(&node);
        Ok(node)
    }

    /// This node's peer ID, derived from its key pair.
    pub fn peer_id(&self) -> PeerId {
        self.inner.peer_id
    }

    /// What this program is, as [`NodeConfig::role`] gave it.
    pub fn role(&self) -> &str {
        &self.inner.role
    }

    /// The timers and lifetimes the node was started with.
    pub fn timing(&self) -> &Timing {
        &self.inner.timing
    }

    /// Where this node's data plane listens, if it has one.
    pub fn data_plane(&self) -> Option<std::net::SocketAddr> {
        self.inner.data_plane
    }

    /// The IP address `peer` is connected from, as this node sees it.
    pub async fn remote_ip(&self, peer: PeerId) -> Option<std::net::IpAddr> {
        let addr = self
            .command(|reply| Command::RemoteAddr(peer, reply))
            .await??;
        crate::common::net::ip_of(&addr)
    }

    /// The network key, for programs that hand it on (the allocator to its instances).
    pub fn network_key(&self) -> Option<&NetworkKey> {
        self.inner.network_key.as_ref()
    }

    /// The addresses the node listens on, each ending in `/p2p/<peer id>`: what others pass
    /// as `--bootstrap`.
    pub async fn listen_addrs(&self) -> Vec<Multiaddr> {
        let p2p = Protocol::P2p(self.inner.peer_id);
        let addrs = self.command(Command::ListenAddrs).await.unwrap_or_default();
        addrs.into_iter().map(|a| a.with(p2p.clone())).collect()
    }

    pub(super) async fn command<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.inner.commands.send(make(tx)).await.ok()?;
        rx.await.ok()
    }

    /// Sends the command `make` builds around a stream's sender; the stream ends when the
    /// driver drops it (at once if the node has stopped).
    pub(super) async fn command_stream<T>(
        &self,
        make: impl FnOnce(fmpsc::UnboundedSender<T>) -> Command,
    ) -> fmpsc::UnboundedReceiver<T> {
        let (tx, rx) = fmpsc::unbounded();
        let _ = self.inner.commands.send(make(tx)).await;
        rx
    }

    /// Announces that this node provides `namespace`; the announcement is renewed before it
    /// expires and repeated whenever a lost bootstrap comes back, until
    /// [`Node::stop_advertising`].
    pub async fn advertise(&self, namespace: &str) {
        let _ = self
            .inner
            .commands
            .send(Command::Advertise(namespace.to_owned()))
            .await;
    }

    /// Stops announcing `namespace`, and tells the peers that may hold its record, so that
    /// others stop finding this node under it now rather than when the record expires
    /// ([`withdraw`]).
    pub async fn stop_advertising(&self, namespace: &str) {
        withdraw::withdraw(self, vec![namespace.to_owned()]).await;
    }

    /// The namespaces this node advertises.
    pub async fn advertised(&self) -> Vec<String> {
        self.command(Command::Advertised).await.unwrap_or_default()
    }

    /// Finds the providers of `namespace` other than this node. Peers arrive as the DHT query
    /// finds them, each once, then those that the closest holders list beyond the 20 a
    /// Kademlia answer holds ([`providers`]); the stream ends after that. A lookup within 10 s
    /// of the last one of `namespace` gets what that one found first, at once, less any that
    /// withdrew since (`found`'s rules). The node dials each one while it knows its
    /// addresses, so a stream can be opened to it right away.
    pub async fn find_providers(&self, namespace: &str) -> BoxStream<'static, PeerId> {
        let findings = self
            .command_stream(|found| Command::FindProviders(namespace.to_owned(), found))
            .await;
        // Fused: callers read it in `select!` loops, which poll it again after its end.
        let found = providers::complete(self.clone(), namespace.to_owned(), findings);
        found.fuse().boxed()
    }

    /// The providers of `namespace` this node's own DHT store holds (unexpired), without
    /// asking anyone: what this node would answer to a lookup.
    pub async fn local_providers(&self, namespace: &str) -> Vec<PeerId> {
        let stored = self.local_provider_records(namespace).await;
        stored.into_iter().map(|record| record.provider).collect()
    }

    /// When the record this node stores of `provider` under `namespace` lapses unless its
    /// provider renews it (None: no such record, or one that never lapses).
    pub async fn local_provider_expiry(
        &self,
        namespace: &str,
        provider: PeerId,
    ) -> Option<Instant> {
        let stored = self.local_provider_records(namespace).await;
        stored
            .into_iter()
            .find(|record| record.provider == provider)?
            .expires
    }

    pub(super) async fn local_provider_records(&self, namespace: &str) -> Vec<ProviderRecord> {
        let namespace = namespace.to_owned();
        self.command(|reply| Command::LocalProviders(namespace, reply))
            .await
            .unwrap_or_default()
    }

    /// The peers this node has a connection to.
    pub async fn connected_peers(&self) -> Vec<PeerId> {
        self.command(Command::ConnectedPeers)
            .await
            .unwrap_or_default()
    }

    /// What this node has measured of the RTT to `peer`.
    pub fn rtt(&self, peer: &PeerId) -> Option<RttStats> {
        self.inner.rtt.get(peer, Instant::now())
    }

    /// The RTT table itself, for exporters that read every peer.
    pub fn rtt_table(&self) -> &Arc<RttTable> {
        &self.inner.rtt
    }

    /// A control to open and accept raw streams of the node's protocols.
    pub fn streams(&self) -> libp2p_stream::Control {
        self.inner.streams.clone()
    }

    /// A token cancelled once the node has stopped.
    pub fn stopped(&self) -> CancellationToken {
        self.inner.stopped.clone()
    }

    /// A handle that does not keep the node alive.
    pub fn downgrade(&self) -> WeakNode {
        WeakNode(Arc::downgrade(&self.inner))
    }

    /// Withdraws what the node advertises ([`Node::stop_advertising`]), closes every
    /// connection and stops the node; other clones become inert.
    pub async fn shutdown(&self) {
        withdraw::withdraw(self, self.advertised().await).await;
        let _ = self.inner.commands.send(Command::Shutdown).await;
        let handle = self
            .inner
            .driver
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(handle) = handle {
            let _ = handle.await;
        }
    }
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("peer_id", &self.inner.peer_id)
            .field("role", &self.inner.role)
            .finish()
    }
}

/// A [`Node`] handle that does not keep the node running.
#[derive(Clone)]
pub struct WeakNode(Weak<Inner>);

impl WeakNode {
    /// The node, if some [`Node`] handle still exists.
    pub fn upgrade(&self) -> Option<Node> {
        self.0.upgrade().map(|inner| Node { inner })
    }
}
