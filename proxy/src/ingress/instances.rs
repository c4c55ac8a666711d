//! The instances of every service the ingress has used: found as providers of the service's
//! digest on the overlay, kept in a [`Chooser`] each, refreshed in the background while the
//! service is in use, and probed a few times a second so that each has a fresh RTT whatever
//! share of the traffic it gets.

use std::{
    cell::Cell,
    collections::{HashMap, HashSet},
    hash::{BuildHasher, RandomState},
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use control::{overlay::Node, rpc::NodeInfoProtocol};
use futures::StreamExt;
use libp2p::PeerId;
use tokio::sync::Notify;

use super::allocation::AllocationState;
use crate::{
    config::perf::{Limits, Policy},
    forward::probe,
    metrics::ServiceView,
    select::{Chooser, Decision},
    transport::Transport,
};

/// How long a service with no instance found waits before its instances are looked for again.
const EMPTY_RETRY: Duration = Duration::from_secs(1);
/// How often the instances of a service are looked for again (in the background) while it is
/// in use.
const REFRESH: Duration = Duration::from_secs(10);
/// How often each instance of a service in use is probed.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(200);
/// A probe not answered within this counts as a failure.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// A service is probed while it served a request within this.
const IN_USE: Duration = Duration::from_secs(30);

/// One service (by digest).
pub(super) struct Service {
    /// Its name, for metrics and messages.
    name: String,
    pub(super) chooser: Chooser<PeerId>,
    addrs: HashMap<PeerId, SocketAddr>,
    refreshed: Option<Instant>,
    /// A background discovery is running (one at a time per service).
    refreshing: bool,
    probing: HashSet<PeerId>,
    last_used: Instant,
    /// Woken when instances are found or an allocation ends.
    pub(super) changed: Arc<Notify>,
    pub(super) allocation: AllocationState,
}

/// The outcome of [`Services::choose`].
pub(super) struct Choice {
    pub decision: Decision<PeerId>,
    pub addr: Option<SocketAddr>,
    /// No instance is known and none was looked for a moment ago: the caller should discover
    /// before giving up.
    pub discover_now: bool,
    /// Instances known, usable or not.
    pub known: usize,
}

pub(super) struct Services {
    node: Node,
    transport: Arc<Transport>,
    policy: Policy,
    by_digest: Mutex<HashMap<String, Service>>,
}

thread_local! {
    static RANDOM: Cell<u64> = Cell::new(RandomState::new().hash_one(std::thread::current().id()) | 1);
}

/// A number below `n` from a per-thread xorshift generator: choosing instances needs speed,
/// not cryptographic quality.
fn random_below(n: usize) -> usize {
    RANDOM.with(|state| {
        let mut x = state.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        state.set(x);
        (x % n as u64) as usize
    })
}

impl Services {
    pub(super) fn new(node: Node, transport: Arc<Transport>, policy: Policy) -> Arc<Self> {
        Arc::new(Self {
            node,
            transport,
            policy,
            by_digest: Mutex::default(),
        })
    }

    fn all(&self) -> MutexGuard<'_, HashMap<String, Service>> {
        self.by_digest.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the service of `digest`, created empty if it is new.
    pub(super) fn with<T>(&self, digest: &str, name: &str, f: impl FnOnce(&mut Service) -> T) -> T {
        let mut all = self.all();
        // Looked up first: the key is only copied when the service is new.
        if let Some(service) = all.get_mut(digest) {
            return f(service);
        }
        let service = all.entry(digest.to_owned()).or_insert_with(|| Service {
            name: name.to_owned(),
            chooser: Chooser::new(self.policy),
            addrs: HashMap::new(),
            refreshed: None,
            refreshing: false,
            probing: HashSet::new(),
            last_used: Instant::now(),
            changed: Arc::new(Notify::new()),
            allocation: AllocationState::default(),
        });
        f(service)
    }

    /// Where the next request for `digest` goes. Known instances are served from at once and
    /// refreshed in the background when their list is old.
    pub(super) fn choose(
        self: &Arc<Self>,
        digest: &str,
        name: &str,
        limits: Limits,
        avoid: Option<&PeerId>,
    ) -> Choice {
        let now = Instant::now();
        self.with(digest, name, |service| {
            service.last_used = now;
            let stale = service.refreshed.is_none_or(|at| now - at > REFRESH);
            if !service.chooser.is_empty() && stale && !service.refreshing {
                service.refreshing = true;
                let (this, digest) = (Arc::clone(self), digest.to_owned());
                tokio::spawn(async move { this.discover(&digest).await });
            }
            let decision = service
                .chooser
                .choose_avoiding(now, limits, random_below, avoid);
            let addr = decision
                .pick
                .and_then(|peer| service.addrs.get(&peer).copied());
            let discover_now = service.chooser.is_empty()
                && service.refreshed.is_none_or(|at| now - at >= EMPTY_RETRY);
            Choice {
                decision,
                addr,
                discover_now,
                known: service.chooser.len(),
            }
        })
    }

    /// The peers known for `digest`.
    pub(super) fn known(&self, digest: &str) -> HashSet<PeerId> {
        self.all()
            .get(digest)
            .map(|s| s.addrs.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Finds the providers of `digest`, asks each new one where its data plane listens, adds
    /// it (to be probed before it gets traffic) and wakes requests waiting for instances.
    pub(super) async fn discover(&self, digest: &str) {
        let known = self.known(digest);
        let mut providers = self.node.find_providers(digest).await;
        let mut found = Vec::new();
        while let Some(peer) = providers.next().await {
            if known.contains(&peer) || found.iter().any(|(p, _)| *p == peer) {
                continue;
            }
            if let Some(addr) = self.data_plane_of(peer).await {
                found.push((peer, addr));
            }
        }
        let now = Instant::now();
        let mut all = self.all();
        let Some(service) = all.get_mut(digest) else {
            return;
        };
        for (peer, addr) in &found {
            tracing::debug!(service = %service.name, %peer, %addr, "instance found");
            service.chooser.add(*peer, now);
            service.addrs.insert(*peer, *addr);
        }
        service.refreshed = Some(now);
        service.refreshing = false;
        if !found.is_empty() {
            service.changed.notify_waiters();
        }
    }

    /// Where `peer`'s data plane listens, by asking it; an unspecified IP is replaced by the
    /// one the overlay reaches it at.
    async fn data_plane_of(&self, peer: PeerId) -> Option<SocketAddr> {
        let info = self
            .node
            .request::<NodeInfoProtocol>(peer, &())
            .await
            .ok()?;
        let mut addr = info.data_plane?;
        if addr.ip().is_unspecified() {
            addr.set_ip(self.node.remote_ip(peer).await?);
        }
        Some(addr)
    }

    /// Starts a probe of every instance of every service in use that has none running.
    pub(super) fn probe_round(self: &Arc<Self>) {
        let now = Instant::now();
        let mut all = self.all();
        for (digest, service) in all.iter_mut() {
            if now - service.last_used > IN_USE {
                continue;
            }
            for (&peer, &addr) in &service.addrs {
                if !service.probing.insert(peer) {
                    continue;
                }
                service.chooser.probe_sent(&peer, now);
                let (this, digest) = (Arc::clone(self), digest.clone());
                tokio::spawn(async move {
                    let result = tokio::time::timeout(PROBE_TIMEOUT, async {
                        let connection = this
                            .transport
                            .connect(peer, addr)
                            .await
                            .map_err(|e| e.to_string())?;
                        probe(&connection).await.map_err(|e| e.to_string())
                    })
                    .await
                    .unwrap_or_else(|_| Err("no answer".into()));
                    let now = Instant::now();
                    let mut all = this.all();
                    let Some(service) = all.get_mut(&digest) else {
                        return;
                    };
                    service.probing.remove(&peer);
                    match result {
                        Ok(rtt) => {
                            service.chooser.probe_answered(&peer);
                            service.chooser.record_rtt(&peer, rtt, now);
                            service.chooser.outcome(&peer, true, now);
                        }
                        Err(error) => {
                            tracing::debug!(service = %service.name, %peer, %error, "probe failed");
                            service.chooser.outcome(&peer, false, now);
                        }
                    }
                });
            }
        }
    }

    /// Every service and its instances, for metrics.
    pub(super) fn view(&self) -> Vec<ServiceView> {
        let now = Instant::now();
        self.all()
            .values_mut()
            .map(|service| ServiceView {
                service: service.name.clone(),
                instances: service.chooser.view(now),
            })
            .collect()
    }
}
