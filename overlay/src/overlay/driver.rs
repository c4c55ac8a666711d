//! The task that owns the libp2p swarm: it turns [`Command`]s from [`Node`](super::Node)
//! handles into swarm calls and swarm events into RTT samples, provider results and bootstrap
//! reconnections. All I/O of the overlay happens here.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{StreamExt, channel::mpsc as fmpsc};
use libp2p::{
    Multiaddr, PeerId, Swarm, TransportError,
    core::transport::ListenerId,
    identify, kad,
    kad::store::MemoryStore,
    multiaddr::Protocol,
    ping,
    swarm::{
        ConnectionId, DialError, SwarmEvent,
        dial_opts::{DialOpts, PeerCondition},
    },
};
use tokio::sync::{mpsc, oneshot};

use super::{
    NodeConfig, StartError,
    behaviour::{Behaviour, BehaviourEvent, KAD_PROTOCOL},
    bootstrap::{Action, Bootstraps, Timer},
    connections::{self, Connections, Open},
    found::Found,
    keep::KeptByPeer,
    namespace::record_key,
    providers::{ANSWER_LIMIT, Finding, HOLDERS_ASKED},
    tombstones::{self, Tombstones},
};
use crate::rtt::RttTable;

/// Requests from [`Node`](super::Node) handles (and the driver's own timers).
pub(crate) enum Command {
    Advertise(String),
    /// Announce a namespace advertised again while its withdrawal's tombstone stood, if it is
    /// still advertised ([`super::tombstones`] rule 3).
    Announce(String),
    /// Stop announcing these namespaces; the reply says which were announced and whether
    /// announcements of them are under way ([`super::withdraw`]).
    StopAdvertising(Vec<String>, oneshot::Sender<Withdrawal>),
    /// The peers that may hold this node's records of these namespaces, as they are found
    /// ([`Driver::find_holders`]); the stream ends when the last query does.
    FindHolders(Vec<String>, fmpsc::UnboundedSender<PeerId>),
    /// A peer withdrew its records of these namespaces; the reply says they are gone here.
    Withdrawn(PeerId, Vec<String>, oneshot::Sender<()>),
    Advertised(oneshot::Sender<Vec<String>>),
    FindProviders(String, fmpsc::UnboundedSender<Finding>),
    /// Providers of a namespace that holders listed beyond a lookup's query
    /// ([`super::providers`]): those that have not withdrawn at this node lately are dialled at
    /// these addresses and recorded in [`Found`], and the reply lists them.
    FoundMore(
        String,
        Vec<(PeerId, Vec<Multiaddr>)>,
        oneshot::Sender<Vec<PeerId>>,
    ),
    LocalProviders(String, oneshot::Sender<Vec<kad::ProviderRecord>>),
    ConnectedPeers(oneshot::Sender<Vec<PeerId>>),
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    RemoteAddr(PeerId, oneshot::Sender<Option<Multiaddr>>),
    Timer(Timer),
    Shutdown,
}

/// What stopping to announce namespaces left to do: tell the peers that may hold their records
/// ([`Command::FindHolders`]), once the announcements already under way have gone out.
pub(crate) struct Withdrawal {
    /// The namespaces that were announced (those that were not need no withdrawal).
    pub namespaces: Vec<String>,
    /// Set if kad's announcements of these namespaces were under way (a first publication or a
    /// republication): dropped once they have handed their `ADD_PROVIDER` messages to the
    /// connections. A withdrawal sent before them could be overtaken and the record put back
    /// until it expires.
    pub under_way: Option<oneshot::Receiver<()>>,
}

/// How often peers without recent RTT samples are looked for.
const EXPIRY_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Start-up in progress: listeners not yet bound, then joining.
struct Startup {
    reply: oneshot::Sender<Result<(), StartError>>,
    unbound: HashMap<ListenerId, Multiaddr>,
}

/// One running provider search.
struct Search {
    namespace: String,
    /// None once the caller stopped listening; the query still runs to its end, so that
    /// what it found is complete when recorded in [`Found`].
    results: Option<fmpsc::UnboundedSender<Finding>>,
    /// Every provider sent to `results` (from [`Found`] or the query).
    seen: HashSet<PeerId>,
    /// The providers the query itself found, recorded in [`Found`] when it ends.
    found: Vec<PeerId>,
}

pub(crate) struct Driver {
    swarm: Swarm<Behaviour>,
    bootstraps: Bootstraps,
    advertised: BTreeSet<String>,
    searches: HashMap<kad::QueryId, Search>,
    /// What recent lookups found, for repeat lookups ([`found`](super::found)).
    found: Found,
    /// Recent withdrawals, this node's and its peers' ([`super::tombstones`]).
    tombstones: Tombstones,
    /// Queries for the peers closest to withdrawn keys ([`Driver::find_holders`]).
    holder_searches: HashMap<kad::QueryId, fmpsc::UnboundedSender<PeerId>>,
    /// Dials under way, to tell withdrawn records' holders that are being connected to.
    dialing: HashMap<ConnectionId, PeerId>,
    /// Withdrawals waiting for these announcements to finish ([`Withdrawal::under_way`]).
    announcing: Vec<(HashSet<kad::QueryId>, oneshot::Sender<()>)>,
    /// Every open connection, for trimming ([`connections`]).
    open: HashMap<ConnectionId, Open<ConnectionId>>,
    limits: Connections,
    /// The address each connected peer's latest connection comes from.
    remote_addrs: HashMap<PeerId, Multiaddr>,
    rtt: Arc<RttTable>,
    peer_expiry: Duration,
    commands: mpsc::Receiver<Command>,
    /// Timers post back into the command queue; weak so that pending timers do not keep a node
    /// whose handles are all gone alive.
    timers: mpsc::WeakSender<Command>,
    startup: Option<Startup>,
    stopping: bool,
}

impl Driver {
    pub fn new(
        swarm: Swarm<Behaviour>,
        config: &NodeConfig,
        rtt: Arc<RttTable>,
        listeners: Vec<(ListenerId, Multiaddr)>,
        commands: mpsc::Receiver<Command>,
        timers: mpsc::WeakSender<Command>,
        reply: oneshot::Sender<Result<(), StartError>>,
    ) -> Self {
        Self {
            swarm,
            bootstraps: Bootstraps::new(&config.bootstraps, config.timing.bootstrap),
            advertised: BTreeSet::new(),
            searches: HashMap::new(),
            found: Found::default(),
            tombstones: Tombstones::default(),
            holder_searches: HashMap::new(),
            dialing: HashMap::new(),
            announcing: Vec::new(),
            open: HashMap::new(),
            limits: config.connections.clone(),
            remote_addrs: HashMap::new(),
            rtt,
            peer_expiry: config.timing.peer_expiry,
            commands,
            timers,
            startup: Some(Startup {
                reply,
                unbound: listeners.into_iter().collect(),
            }),
            stopping: false,
        }
    }
}

pub(crate) async fn run(stopped: tokio_util::sync::CancellationToken, mut driver: Driver) {
    // Cancelled however the loop ends, even by a panic.
    let _stopped = stopped.drop_guard();
    if driver
        .startup
        .as_ref()
        .is_some_and(|s| s.unbound.is_empty())
    {
        // A node that listens nowhere (a short-lived client) joins right away.
        driver.join();
    }
    let mut expiry = tokio::time::interval(EXPIRY_CHECK_INTERVAL);
    expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !driver.stopping {
        tokio::select! {
            event = driver.swarm.select_next_some() => driver.on_swarm_event(event),
            command = driver.commands.recv() => match command {
                Some(command) => driver.on_command(command),
                // Every handle is gone: nobody can use this node any more.
                None => driver.stopping = true,
            },
            _ = expiry.tick() => {
                driver.tombstones.prune(Instant::now());
                for peer in driver.rtt.expire(Instant::now(), driver.peer_expiry) {
                    tracing::debug!(%peer, "no RTT sample for too long, forgetting peer");
                }
            }
        }
    }
    tracing::debug!(peer = %driver.swarm.local_peer_id(), "overlay node stopped");
}

impl Driver {
    fn on_command(&mut self, command: Command) {
        match command {
            Command::Advertise(namespace) => {
                self.announce(&namespace);
                self.advertised.insert(namespace);
            }
            Command::Announce(namespace) => {
                if self.advertised.contains(&namespace) {
                    self.announce(&namespace);
                }
            }
            Command::StopAdvertising(namespaces, reply) => {
                let _ = reply.send(self.stop_advertising(namespaces));
            }
            Command::FindHolders(namespaces, holders) => self.find_holders(&namespaces, holders),
            Command::Withdrawn(peer, namespaces, done) => {
                let now = Instant::now();
                let store = self.swarm.behaviour_mut().kad.store_mut();
                for namespace in &namespaces {
                    let key = record_key(namespace);
                    kad::store::RecordStore::remove_provider(store, &key, &peer);
                    self.tombstones.lay(peer, key, now, tombstones::LINGER);
                }
                self.found.withdrawn(&peer, &namespaces);
                // Nor may a search under way put it back when it ends.
                for search in self.searches.values_mut() {
                    if namespaces.contains(&search.namespace) {
                        search.found.retain(|p| *p != peer);
                    }
                }
                tracing::debug!(%peer, ?namespaces, "peer withdrew its provider records");
                let _ = done.send(());
            }
            Command::Advertised(reply) => {
                let _ = reply.send(self.advertised.iter().cloned().collect());
            }
            Command::FindProviders(namespace, results) => {
                // What the last lookup found first, then the query's own finds.
                let recent = self.found.recent(&namespace, Instant::now());
                let seen: HashSet<PeerId> = recent
                    .iter()
                    .filter(|peer| results.unbounded_send(Finding::Provider(**peer)).is_ok())
                    .copied()
                    .collect();
                for peer in &seen {
                    self.dial(*peer, Vec::new());
                }
                let id = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .get_providers(record_key(&namespace));
                self.searches.insert(
                    id,
                    Search {
                        namespace,
                        results: Some(results),
                        seen,
                        found: Vec::new(),
                    },
                );
            }
            Command::FoundMore(namespace, providers, reply) => {
                let (key, now) = (record_key(&namespace), Instant::now());
                let mut kept = Vec::new();
                for (peer, addrs) in providers {
                    // A holder may have answered just before it was told of a withdrawal.
                    if self.tombstones.standing(&peer, &key, now).is_none() {
                        self.dial(peer, addrs);
                        kept.push(peer);
                    }
                }
                self.found.add(&namespace, kept.clone(), now);
                let _ = reply.send(kept);
            }
            Command::LocalProviders(namespace, reply) => {
                let now = Instant::now();
                let store = self.swarm.behaviour_mut().kad.store_mut();
                let providers = kad::store::RecordStore::providers(store, &record_key(&namespace));
                let live = providers.into_iter().filter(|p| !p.is_expired(now));
                let _ = reply.send(live.collect());
            }
            Command::ConnectedPeers(reply) => {
                let _ = reply.send(self.swarm.connected_peers().copied().collect());
            }
            Command::RemoteAddr(peer, reply) => {
                let _ = reply.send(self.remote_addrs.get(&peer).cloned());
            }
            Command::ListenAddrs(reply) => {
                let _ = reply.send(self.swarm.listeners().cloned().collect());
            }
            Command::Timer(timer) => {
                let actions = self.bootstraps.on_timer(timer);
                self.apply(actions);
            }
            Command::Shutdown => self.stopping = true,
        }
    }

    /// Stops announcing `namespaces`: see [`Withdrawal`] for what is left to do.
    fn stop_advertising(&mut self, namespaces: Vec<String>) -> Withdrawal {
        let (local, now) = (*self.swarm.local_peer_id(), Instant::now());
        let kad = &mut self.swarm.behaviour_mut().kad;
        let mut withdrawn = Vec::new();
        let mut keys = HashSet::new();
        for namespace in namespaces {
            if !self.advertised.remove(&namespace) {
                continue;
            }
            let key = record_key(&namespace);
            kad.stop_providing(&key);
            (self.tombstones).lay(local, key.clone(), now, tombstones::OWN_LINGER);
            withdrawn.push(namespace);
            keys.insert(key);
        }
        let under_way: HashSet<kad::QueryId> = (self.swarm.behaviour_mut().kad.iter_queries())
            .filter(|query| {
                matches!(query.info(), kad::QueryInfo::AddProvider { key, .. } if keys.contains(key))
            })
            .map(|query| query.id())
            .collect();
        let under_way = (!under_way.is_empty()).then(|| {
            let (done, announced) = oneshot::channel();
            self.announcing.push((under_way, done));
            announced
        });
        Withdrawal {
            namespaces: withdrawn,
            under_way,
        }
    }

    /// Sends `holders` the peers that may hold this node's records of `namespaces`: at once,
    /// every peer it is connected or connecting to (kad sends an announcement to a peer it is
    /// not connected to once a dial succeeds) and the closest peers to each key its routing
    /// table knows; then, as kad's queries end, the closest peers to each key the network knows
    /// (where the announcements went, and where lookups look), dialled while the query holds
    /// their addresses.
    fn find_holders(&mut self, namespaces: &[String], holders: fmpsc::UnboundedSender<PeerId>) {
        let mut known: BTreeSet<PeerId> = self.swarm.connected_peers().copied().collect();
        known.extend(self.dialing.values().copied());
        let kad = &mut self.swarm.behaviour_mut().kad;
        for namespace in namespaces {
            let key = kad::KBucketKey::new(record_key(namespace));
            let closest = kad.get_closest_local_peers(&key).take(kad::K_VALUE.get());
            known.extend(closest.map(|peer| *peer.preimage()));
        }
        for peer in known {
            let _ = holders.unbounded_send(peer);
        }
        for namespace in namespaces {
            let id = kad.get_closest_peers(record_key(namespace).to_vec());
            self.holder_searches.insert(id, holders.clone());
        }
    }

    /// A kad query ended: withdrawals waiting only for it can go.
    fn query_finished(&mut self, id: kad::QueryId) {
        // Dropping a waiter's sender is what tells it.
        self.announcing.retain_mut(|(under_way, _)| {
            under_way.remove(&id);
            !under_way.is_empty()
        });
    }

    /// Announces `namespace` now, or when the tombstone of its last withdrawal here falls
    /// ([`super::tombstones`] rule 3).
    fn announce(&mut self, namespace: &str) {
        let (local, now) = (*self.swarm.local_peer_id(), Instant::now());
        match (self.tombstones).standing(&local, &record_key(namespace), now) {
            Some(until) => {
                tracing::debug!(
                    namespace,
                    "advertised again just after its withdrawal: announced once its tombstones fall"
                );
                self.post_after(until - now, Command::Announce(namespace.to_owned()));
            }
            None => {
                tracing::trace!(namespace, peer = %local, "announcing");
                self.publish(namespace)
            }
        }
    }

    /// Announces one namespace to the DHT (kad republishes it every half record lifetime).
    fn publish(&mut self, namespace: &str) {
        if let Err(error) = self
            .swarm
            .behaviour_mut()
            .kad
            .start_providing(record_key(namespace))
        {
            tracing::warn!(namespace, %error, "cannot store own provider record");
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } => {
                tracing::debug!(%address, "listening");
                // The overlay assumes no NAT between members (as the original did): what we
                // listen on is where others reach us. Declaring it external puts it in the
                // provider records we publish, so a lookup answers with usable addresses even
                // from a node that never met us.
                self.swarm.add_external_address(address);
                if let Some(startup) = &mut self.startup
                    && startup.unbound.remove(&listener_id).is_some()
                    && startup.unbound.is_empty()
                {
                    self.join();
                }
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason: Err(error),
                ..
            } => {
                self.fail_listener(listener_id, error.to_string());
            }
            SwarmEvent::ListenerError { listener_id, error } => {
                self.fail_listener(listener_id, error.to_string());
            }
            SwarmEvent::Dialing {
                peer_id: Some(peer),
                connection_id,
            } => {
                self.dialing.insert(connection_id, peer);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                self.dialing.remove(&connection_id);
                let kept = self.swarm.behaviour().keep.wants(&peer_id);
                let opened = Instant::now();
                let open = Open {
                    id: connection_id,
                    opened,
                    kept,
                };
                self.open.insert(connection_id, open);
                self.trim(opened);
                if num_established.get() == 1 {
                    tracing::debug!(peer = %peer_id, addr = %endpoint.get_remote_address(), "peer connected");
                }
                self.remote_addrs
                    .insert(peer_id, endpoint.get_remote_address().clone());
                let actions = self.bootstraps.on_connected(&peer_id);
                self.apply(actions);
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                cause,
                ..
            } => {
                self.open.remove(&connection_id);
                if num_established == 0 {
                    tracing::debug!(peer = %peer_id, ?cause, "peer disconnected");
                    self.remote_addrs.remove(&peer_id);
                    let actions = self.bootstraps.on_disconnected(&peer_id);
                    self.apply(actions);
                }
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id: Some(peer),
                error,
            } => {
                self.dialing.remove(&connection_id);
                tracing::debug!(%peer, error = %dial_error_text(&error), "dial failed");
                let actions = self
                    .bootstraps
                    .on_dial_failed(&peer, dial_error_text(&error));
                self.apply(actions);
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                ..
            } => {
                // With a private network, this is where peers with another key end up.
                tracing::debug!(from = %send_back_addr, %error, "inbound connection failed");
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event { peer, result, .. })) => {
                match result {
                    Ok(rtt) => self.rtt.record(peer, rtt, Instant::now()),
                    Err(error) => tracing::debug!(%peer, %error, "ping failed"),
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) if info.protocols.contains(&KAD_PROTOCOL) => {
                // Peers that speak our DHT go into the routing table at the addresses they
                // listen on, so lookups can reach them: if there is room for them.
                let kad = &mut self.swarm.behaviour_mut().kad;
                if has_room(kad, &peer_id) {
                    for addr in info.listen_addrs {
                        kad.add_address(&peer_id, addr);
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(event)) => self.on_kad_event(event),
            SwarmEvent::Behaviour(BehaviourEvent::Keep(KeptByPeer { peer, connection })) => {
                tracing::debug!(%peer, "connection kept at the peer's request");
                if let Some(open) = self.open.get_mut(&connection) {
                    open.kept = true;
                }
            }
            _ => {}
        }
    }

    fn on_kad_event(&mut self, event: kad::Event) {
        let (id, result, step, stats) = match event {
            kad::Event::OutboundQueryProgressed {
                id,
                result,
                step,
                stats,
            } => (id, result, step, stats),
            kad::Event::InboundRequest { request } => return self.store_inbound(request),
            _ => return,
        };
        if step.last {
            self.query_finished(id);
        }
        match result {
            kad::QueryResult::GetProviders(Ok(kad::GetProvidersOk::FoundProviders {
                providers,
                ..
            })) => self.deliver_providers(id, providers),
            kad::QueryResult::GetProviders(
                Ok(kad::GetProvidersOk::FinishedWithNoAdditionalRecord { closest_peers })
                | Err(kad::GetProvidersError::Timeout { closest_peers, .. }),
            ) => self.end_search(id, &closest_peers),
            kad::QueryResult::GetClosestPeers(result) => {
                let peers = match result {
                    Ok(kad::GetClosestPeersOk { peers, .. }) => peers,
                    Err(kad::GetClosestPeersError::Timeout { peers, .. }) => peers,
                };
                self.deliver_holders(id, peers);
            }
            kad::QueryResult::StartProviding(result) => {
                // Kad counts an announcement done once its ADD_PROVIDER messages are queued:
                // the time is that of finding the closest peers. Incomplete is usual while
                // the network is small or forming; the record is republished.
                let took = stats.duration().unwrap_or_default();
                let (asked, answered) = (stats.num_requests(), stats.num_successes());
                match result {
                    Ok(_) => tracing::debug!(?took, asked, answered, "provider announced"),
                    Err(error) => tracing::debug!(
                        ?took,
                        asked,
                        answered,
                        ?error,
                        "provider announcement incomplete"
                    ),
                }
            }
            _ => {}
        }
        if step.last {
            self.end_search(id, &[]);
            self.holder_searches.remove(&id);
        }
    }

    fn deliver_holders(&mut self, id: kad::QueryId, peers: Vec<kad::PeerInfo>) {
        let Some(holders) = self.holder_searches.get(&id) else {
            return; // a query of the driver's own (joining)
        };
        let holders = holders.clone();
        for kad::PeerInfo { peer_id, addrs } in peers {
            // The query has ended: its addresses are known only from here.
            self.dial(peer_id, addrs);
            let _ = holders.unbounded_send(peer_id);
        }
    }

    /// Stores what a peer sent (kad leaves it to us, [`kad::StoreInserts::FilterBoth`]), less
    /// the announcements a withdrawal overtook ([`super::tombstones`] rule 2).
    fn store_inbound(&mut self, request: kad::InboundRequest) {
        let now = Instant::now();
        let store = self.swarm.behaviour_mut().kad.store_mut();
        let result = match request {
            kad::InboundRequest::AddProvider {
                record: Some(record),
            } => {
                if (self.tombstones)
                    .standing(&record.provider, &record.key, now)
                    .is_some()
                {
                    tracing::debug!(peer = %record.provider, "announcement after its withdrawal dropped");
                    return;
                }
                tracing::trace!(peer = %record.provider, "provider record stored");
                kad::store::RecordStore::add_provider(store, record)
            }
            kad::InboundRequest::PutRecord {
                record: Some(record),
                ..
            } => kad::store::RecordStore::put(store, record),
            _ => return,
        };
        if let Err(error) = result {
            tracing::info!(?error, "record from a peer not stored");
        }
    }

    /// A provider search's query ended (finished or timed out), having reached `holders`
    /// (closest first): what it found answers repeat lookups for a while, and the caller's
    /// stream ends, after naming the holders to ask for more if the query found as many as
    /// an answer holds ([`super::providers`]).
    fn end_search(&mut self, id: kad::QueryId, holders: &[PeerId]) {
        let Some(search) = self.searches.remove(&id) else {
            return;
        };
        if let Some(results) = &search.results
            && search.found.len() >= ANSWER_LIMIT
            && !holders.is_empty()
        {
            let asked = holders.iter().take(HOLDERS_ASKED).copied().collect();
            let _ = results.unbounded_send(Finding::MayHaveMore(asked));
        }
        self.found
            .record(&search.namespace, search.found, Instant::now());
    }

    fn deliver_providers(&mut self, id: kad::QueryId, providers: HashSet<PeerId>) {
        let local = *self.swarm.local_peer_id();
        let Some(search) = self.searches.get_mut(&id) else {
            return;
        };
        let mut to_dial = Vec::new();
        for peer in providers {
            if peer == local || search.found.contains(&peer) {
                continue;
            }
            search.found.push(peer);
            let Some(results) = &search.results else {
                continue;
            };
            // Not sent again if the caller had it from `Found` already (but dialled now that
            // the query holds its addresses).
            if search.seen.insert(peer) && results.unbounded_send(Finding::Provider(peer)).is_err()
            {
                // The caller stopped listening (it had what it needed): the query goes on for
                // `Found`, nobody needs a connection to what it finds.
                search.results = None;
                continue;
            }
            to_dial.push(peer);
        }
        for peer in to_dial {
            // Dial while the query still holds the provider's addresses (kad hands them to the
            // swarm only for the query's lifetime).
            self.dial(peer, Vec::new());
        }
    }

    /// Connects to a peer a query found (a provider, a holder), at `addrs` and the addresses
    /// the behaviours know, so that a stream can be opened to it at once.
    fn dial(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        if !self.swarm.is_connected(&peer) {
            let _ = self.swarm.dial(
                DialOpts::peer_id(peer)
                    .addresses(addrs)
                    .extend_addresses_through_behaviour()
                    .condition(PeerCondition::DisconnectedAndNotDialing)
                    .build(),
            );
        }
    }

    /// Closes connections beyond the water marks ([`connections::to_close`]).
    fn trim(&mut self, now: Instant) {
        if self.limits.keep_all || self.open.len() <= self.limits.high {
            return; // the common case, without a copy of every connection
        }
        let open: Vec<Open<ConnectionId>> = self.open.values().copied().collect();
        let excess = connections::to_close(&self.limits, &open, now);
        if !excess.is_empty() {
            tracing::debug!(
                open = open.len(),
                closing = excess.len(),
                "above the high water mark"
            );
        }
        for id in excess {
            self.swarm.close_connection(id);
        }
    }

    fn fail_listener(&mut self, listener: ListenerId, reason: String) {
        if let Some(startup) = &mut self.startup
            && let Some(addr) = startup.unbound.remove(&listener)
        {
            self.finish_startup(Err(StartError::Listen { addr, reason }));
        } else {
            tracing::warn!(%reason, "a listener failed");
        }
    }

    /// All listeners are bound: join the overlay through the bootstraps.
    fn join(&mut self) {
        let kad = &mut self.swarm.behaviour_mut().kad;
        for bootstrap in self.bootstraps.addrs() {
            kad.add_address(&bootstrap.peer, without_p2p(&bootstrap.addr));
        }
        let actions = self.bootstraps.start();
        self.apply(actions);
    }

    fn finish_startup(&mut self, result: Result<(), StartError>) {
        if let Some(startup) = self.startup.take() {
            if result.is_err() {
                self.stopping = true;
            }
            let _ = startup.reply.send(result);
        }
    }

    fn apply(&mut self, actions: Vec<Action>) {
        let mut queue = std::collections::VecDeque::from(actions);
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Dial(peer, addr) => {
                    let opts = DialOpts::peer_id(peer)
                        .addresses(vec![without_p2p(&addr)])
                        .condition(PeerCondition::DisconnectedAndNotDialing)
                        .build();
                    match self.swarm.dial(opts) {
                        Ok(()) | Err(DialError::DialPeerConditionFalse(_)) => {}
                        Err(error) => queue.extend(
                            self.bootstraps
                                .on_dial_failed(&peer, dial_error_text(&error)),
                        ),
                    }
                }
                Action::Schedule(timer, delay) => self.post_after(delay, Command::Timer(timer)),
                Action::Joined => {
                    self.find_neighbours();
                    self.finish_startup(Ok(()));
                }
                Action::JoinFailed(error) => self.finish_startup(Err(error.into())),
                Action::Reconnected(peer) => {
                    tracing::info!(%peer, "bootstrap reconnected, re-advertising");
                    self.refresh_routing();
                    for namespace in self.advertised.clone() {
                        self.announce(&namespace);
                    }
                }
            }
        }
    }

    /// Posts `command` to this driver after `delay` (unless every handle is gone by then).
    fn post_after(&self, delay: Duration, command: Command) {
        let commands = self.timers.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            if let Some(commands) = commands.upgrade() {
                let _ = commands.send(command).await;
            }
        });
    }

    /// A joining node's one query: the peers nearest its own ID, which fills the near end of
    /// its routing table and puts it into its neighbours'. kad itself then refreshes the rest
    /// of the table (a query per bucket) once: its automatic bootstrap, started when a routing
    /// table holds fewer than K peers. Starting that full refresh here as well ran it twice per
    /// joining node, each contacting most of a 200-node network.
    fn find_neighbours(&mut self) {
        let local = *self.swarm.local_peer_id();
        self.swarm.behaviour_mut().kad.get_closest_peers(local);
    }

    /// Fills the routing table from the peers known so far.
    fn refresh_routing(&mut self) {
        // Fails only when the routing table is empty: the first bootstrap of a network.
        let _ = self.swarm.behaviour_mut().kad.bootstrap();
    }
}

/// Whether `peer` may enter the routing table (or is in it already): its bucket is not full.
///
/// Kademlia keeps the contacts it has known longest; a newcomer to a full bucket waits for one
/// of them to fail. kad checks whether the oldest is alive by dialing it each time a newcomer
/// is offered, and since idle connections close, a contact is "disconnected" nearly always:
/// every newcomer met in a full bucket's range would cost a connection to an old contact (and
/// that contact's identify offers us to its own full buckets). So newcomers are added only
/// where there is room; a contact that really is gone leaves the table when a query cannot
/// reach it, and makes room. Peers kad meets by itself are not inserted either
/// ([`kad::BucketInserts::Manual`]): identify's listen addresses are the one way in.
fn has_room(kad: &mut kad::Behaviour<MemoryStore>, peer: &PeerId) -> bool {
    let Some(bucket) = kad.kbucket(*peer) else {
        return false; // our own ID
    };
    bucket.num_entries() < kad::K_VALUE.get()
        || bucket.iter().any(|entry| entry.node.key.preimage() == peer)
}

fn without_p2p(addr: &Multiaddr) -> Multiaddr {
    addr.iter()
        .filter(|p| !matches!(p, Protocol::P2p(_)))
        .collect()
}

/// The innermost cause of an error: "Connection refused", not five layers of wrapping.
fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current = error;
    while let Some(source) = current.source() {
        current = source;
    }
    current.to_string()
}

fn dial_error_text(error: &DialError) -> String {
    match error {
        DialError::Transport(attempts) => {
            let causes: Vec<String> = attempts.iter().map(|(_, e)| root_cause(e)).collect();
            causes.join("; ")
        }
        other => root_cause(other),
    }
}

pub(crate) fn transport_error_text(error: &TransportError<std::io::Error>) -> String {
    match error {
        TransportError::MultiaddrNotSupported(addr) => {
            format!("{addr} is not a TCP address this node can listen on")
        }
        TransportError::Other(e) => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` peers in the bucket farthest from `local`, the one half of all IDs fall into.
    fn farthest(local: PeerId, n: usize) -> Vec<PeerId> {
        let key = kad::KBucketKey::from(local);
        std::iter::repeat_with(PeerId::random)
            .filter(|peer| key.distance(&kad::KBucketKey::from(*peer)).ilog2() == Some(255))
            .take(n)
            .collect()
    }

    #[test]
    fn a_full_bucket_takes_no_newcomer_and_keeps_its_contacts() {
        let local = PeerId::random();
        let mut kad = kad::Behaviour::new(local, MemoryStore::new(local));
        let addr: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().expect("valid");
        let k = kad::K_VALUE.get();
        let peers = farthest(local, k + 1);
        for peer in &peers[..k] {
            assert!(has_room(&mut kad, peer), "the bucket fills up to K");
            kad.add_address(peer, addr.clone());
        }
        assert!(
            !has_room(&mut kad, &peers[k]),
            "a newcomer to a full bucket"
        );
        assert!(has_room(&mut kad, &peers[0]), "a contact already in it");
        assert!(!has_room(&mut kad, &local), "ourselves");
    }
}
