//! The driver of the routing cores: one [`ServiceCore`] per service used, behind one lock
//! that is held only while a core is called. What a core asks for ([`Action`]) is done after
//! the lock is released: probes, discoveries and allocations as tasks of their own, wake-ups
//! through the service's [`Notify`], checking a silent instance's connection and closing a
//! dead one's. A ticker calls every core twenty times a second while a service is in use
//! (once a second otherwise) so that probes and refreshes happen without requests, and
//! retunes every core when perf.conf was reloaded ([`crate::config::live`]): each service
//! gets its new limits and tuning in place, its RTT history and instances kept.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use futures::StreamExt;
use libp2p::PeerId;
use mtc_overlay::{overlay::Node, rpc::NodeInfoProtocol};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{
    allocation::{AllocationError, Reason, Unreachable, ask_allocators},
    limits::Limit,
    records::Resolved,
    routing::{Action, ServiceCore},
};
use crate::{
    config::{
        live::LivePerf,
        perf::{Overrides, PerfConfig, ServiceSettings},
    },
    forward::probe,
    metrics::{IngressMetrics, ServiceView},
    retry::RetryBudget,
    transport::Transport,
};

/// How often every core is told the time while a service is in use...
const TICK: Duration = Duration::from_millis(50);
/// ...and while none is (or none was ever asked for): a core that is not in use only looks
/// for instances that went away, every `discover-interval` (1 s by default). Twenty ticks a
/// second were most of an idle proxy's wake-ups (and 0.2–0.3 % of a core).
const IDLE_TICK: Duration = Duration::from_secs(1);

/// How many new instances one discovery asks for their data plane at once.
const ASKED_AT_ONCE: usize = 32;

/// One service (by its instance key).
struct Entry {
    service: Arc<Resolved>,
    core: ServiceCore<PeerId>,
    /// Woken on [`Action::Wake`].
    changed: Arc<Notify>,
}

/// How `service` is routed under `config`: its record's limits win over perf.conf's.
fn settings_of(config: &PerfConfig, service: &Resolved) -> ServiceSettings {
    let record = &service.record;
    config.service(
        &record.name,
        Overrides {
            soft_rtt: record.limits.soft_rtt,
            hard_rtt: record.limits.hard_rtt,
        },
    )
}

/// Every service's core, and the configuration they were tuned with.
struct Table {
    entries: HashMap<String, Entry>,
    config: Arc<PerfConfig>,
    /// [`LivePerf::generation`] of `config`.
    generation: u64,
}

pub(super) struct Services {
    node: Node,
    transport: Arc<Transport>,
    metrics: IngressMetrics,
    perf: Arc<LivePerf>,
    /// The ingress's retry budget, retuned with the rest.
    retries: Arc<RetryBudget>,
    max_waiting: usize,
    /// How long an allocated instance may take to appear on the overlay.
    instance_wait: Duration,
    table: Mutex<Table>,
    /// Peers that closed their connection to this proxy (taken by the ticker).
    closes: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<PeerId>>>,
    /// Allocators that could not be reached lately: asked last.
    unreachable: Mutex<Unreachable>,
    /// Set while the ticker ticks every [`IDLE_TICK`]; the first request then wakes it.
    ticking_idle: AtomicBool,
    ticker: Notify,
}

/// What to do once the lock is released.
pub(super) struct Todo {
    key: String,
    actions: Vec<Action<PeerId>>,
    changed: Arc<Notify>,
}

impl Services {
    pub(super) fn new(
        node: Node,
        transport: Arc<Transport>,
        metrics: IngressMetrics,
        perf: Arc<LivePerf>,
        retries: Arc<RetryBudget>,
        max_waiting: usize,
        instance_wait: Duration,
    ) -> Arc<Self> {
        let closes = Mutex::new(Some(transport.watch_closes()));
        let (generation, config) = perf.current();
        retries.retune(config.budget);
        Arc::new(Self {
            closes,
            node,
            transport,
            metrics,
            perf,
            retries,
            max_waiting,
            instance_wait,
            table: Mutex::new(Table {
                entries: HashMap::new(),
                config,
                generation,
            }),
            unreachable: Mutex::default(),
            ticking_idle: AtomicBool::new(false),
            ticker: Notify::new(),
        })
    }

    /// A stream to an instance had to wait for the instance's limit of concurrent streams.
    pub(super) fn stream_limit_hit(&self) {
        self.metrics.limit_hit(Limit::PeerStreams);
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Retunes every core if perf.conf was reloaded since they were tuned: at each choice
    /// and tick, so a reload applies from the next request on (one atomic load when
    /// nothing changed).
    fn follow_reloads(&self, table: &mut Table) {
        if self.perf.generation() == table.generation {
            return;
        }
        let now = Instant::now();
        let (generation, config) = self.perf.current();
        for entry in table.entries.values_mut() {
            entry.core.retune(settings_of(&config, &entry.service), now);
        }
        self.retries.retune(config.budget);
        table.config = config;
        table.generation = generation;
    }

    /// Calls `f` on the core of `service` (created if new) with a list for its actions, which
    /// are carried out after the lock is released. Returns what `f` returned and the service's
    /// wake-up.
    pub(super) fn with<T>(
        self: &Arc<Self>,
        service: &Arc<Resolved>,
        f: impl FnOnce(&mut ServiceCore<PeerId>, &mut Vec<Action<PeerId>>) -> T,
    ) -> (T, Arc<Notify>) {
        let mut actions = Vec::new();
        let (value, changed) = {
            let mut table = self.table();
            self.follow_reloads(&mut table);
            let Table {
                entries, config, ..
            } = &mut *table;
            // Looked up first: the key is only copied when the service is new.
            let entry = match entries.get_mut(&service.key) {
                Some(entry) => entry,
                None => entries.entry(service.key.clone()).or_insert_with(|| Entry {
                    service: Arc::clone(service),
                    core: ServiceCore::new(settings_of(config, service), self.max_waiting),
                    changed: Arc::new(Notify::new()),
                }),
            };
            // A record fetched again may carry other limits.
            if !Arc::ptr_eq(&entry.service, service) {
                entry.service = Arc::clone(service);
                entry
                    .core
                    .retune(settings_of(config, service), Instant::now());
            }
            (f(&mut entry.core, &mut actions), Arc::clone(&entry.changed))
        };
        if self.ticking_idle.load(Ordering::Relaxed) {
            // A service is in use again: ticks at [`TICK`] from now on (one permit is kept
            // even if the ticker is not waiting yet).
            self.ticking_idle.store(false, Ordering::Relaxed);
            self.ticker.notify_one();
        }
        if !actions.is_empty() {
            self.perform(Todo {
                key: service.key.clone(),
                actions,
                changed: Arc::clone(&changed),
            });
        }
        (value, changed)
    }

    /// Like [`Services::with`] for a service known by key only (from a task of the driver);
    /// nothing happens if it is gone.
    fn with_key(
        self: &Arc<Self>,
        key: &str,
        f: impl FnOnce(&mut ServiceCore<PeerId>, &mut Vec<Action<PeerId>>),
    ) {
        let todo = {
            let mut table = self.table();
            let Some(entry) = table.entries.get_mut(key) else {
                return;
            };
            let mut actions = Vec::new();
            f(&mut entry.core, &mut actions);
            Todo {
                key: key.to_owned(),
                actions,
                changed: Arc::clone(&entry.changed),
            }
        };
        self.perform(todo);
    }

    /// Tells every core the time, every [`TICK`] while a service is in use and every
    /// [`IDLE_TICK`] otherwise, and of the peers that closed their connections, until `stop`.
    pub(super) async fn tick_until(self: Arc<Self>, stop: CancellationToken) {
        let taken = self.closes.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(mut closes) = taken else {
            return;
        };
        // Moved only by a tick, so that closes (or wake-ups) coming faster than ticks never
        // hold ticks off.
        let mut next_tick = tokio::time::Instant::now() + TICK;
        loop {
            let closed = tokio::select! {
                () = tokio::time::sleep_until(next_tick) => None,
                () = self.ticker.notified() => None,
                Some(peer) = closes.recv() => Some(peer),
                _ = stop.cancelled() => return,
            };
            let now = Instant::now();
            let mut table = self.table();
            if closed.is_none() {
                let idle = !table.entries.values().any(|entry| entry.core.in_use(now));
                next_tick = tokio::time::Instant::now() + if idle { IDLE_TICK } else { TICK };
                self.ticking_idle.store(idle, Ordering::Relaxed);
            }
            self.follow_reloads(&mut table);
            let todos: Vec<Todo> = table
                .entries
                .iter_mut()
                .filter_map(|(key, entry)| {
                    let mut actions = Vec::new();
                    match closed {
                        Some(peer) => {
                            if entry.core.known().any(|known| *known == peer) {
                                tracing::debug!(service = %key, %peer, "instance closed its connection");
                            }
                            entry.core.closed_by_peer(&peer, now, &mut actions);
                        }
                        None => entry.core.tick(now, &mut actions),
                    }
                    (!actions.is_empty()).then(|| Todo {
                        key: key.clone(),
                        actions,
                        changed: Arc::clone(&entry.changed),
                    })
                })
                .collect();
            drop(table);
            for todo in todos {
                self.perform(todo);
            }
        }
    }

    /// Carries out a core's actions (never under the lock).
    fn perform(self: &Arc<Self>, todo: Todo) {
        let Todo {
            key,
            actions,
            changed,
        } = todo;
        for action in actions {
            match action {
                Action::Wake => changed.notify_waiters(),
                Action::CheckSilent(peer) => {
                    let (this, key) = (Arc::clone(self), key.clone());
                    tokio::spawn(async move {
                        let silence = this.transport.check_silence(&peer).await;
                        tracing::debug!(service = %key, %peer, ?silence, "connection checked for silence");
                        this.with_key(&key, |core, actions| {
                            core.silence_checked(&peer, silence, Instant::now(), actions);
                        });
                    });
                }
                Action::Close(peer) => {
                    tracing::debug!(service = %key, %peer, "instance dead or gone: connection closed");
                    self.transport.close_connection(&peer);
                }
                Action::Probe(peer, addr) => {
                    let (this, key) = (Arc::clone(self), key.clone());
                    tokio::spawn(async move { this.probe(key, peer, addr).await });
                }
                Action::Discover => {
                    let (this, key) = (Arc::clone(self), key.clone());
                    tokio::spawn(async move {
                        let found = this.discover(&key).await;
                        this.discovered(&key, &found);
                    });
                }
                Action::Allocate(reason) => {
                    let (this, key) = (Arc::clone(self), key.clone());
                    tokio::spawn(async move { this.allocate(key, reason).await });
                }
            }
        }
    }

    async fn probe(self: Arc<Self>, key: String, peer: PeerId, addr: SocketAddr) {
        let Some(timeout) = self
            .table()
            .entries
            .get(&key)
            .map(|entry| entry.core.settings().tuning.probe_timeout)
        else {
            return;
        };
        let result = tokio::time::timeout(timeout, async {
            let connection = self
                .transport
                .connect(peer, addr)
                .await
                .map_err(|e| e.to_string())?;
            let (rtt, health) = probe(&connection).await.map_err(|e| e.to_string())?;
            // A sidecar slow to answer (its machine loaded) does not make the path longer.
            Ok::<_, String>((rtt.min(connection.rtt()), health))
        })
        .await
        .unwrap_or_else(|_| Err("no answer".into()));
        let now = Instant::now();
        let answer = match result {
            Ok((rtt, health)) => {
                tracing::trace!(service = %key, %peer, ?rtt, ?health, "probe answered");
                Some((rtt, health))
            }
            Err(error) => {
                tracing::debug!(service = %key, %peer, %error, "probe failed");
                None
            }
        };
        self.with_key(&key, |core, actions| {
            core.probed(&peer, now, answer, actions);
        });
    }

    /// The instances of the service with instance key `key` on the overlay, with the address
    /// of each one's data plane. Only new ones are asked for it, each as soon as it is found:
    /// a known instance that is listed keeps the address it had, even if it cannot answer now
    /// (frozen, say), since listed is what this is about; whether it answers is the probes'
    /// business.
    async fn discover(&self, key: &str) -> Vec<(PeerId, SocketAddr)> {
        let known: HashMap<PeerId, SocketAddr> = self
            .table()
            .entries
            .get(key)
            .map(|entry| entry.core.addresses().collect())
            .unwrap_or_default();
        let mut seen = HashSet::new();
        let providers = self.node.find_providers(key).await;
        providers
            .filter(move |peer| std::future::ready(seen.insert(*peer)))
            .map(|peer| {
                let known = known.get(&peer).copied();
                async move {
                    let addr = match known {
                        Some(addr) => Some(addr),
                        None => self.data_plane_of(peer).await,
                    };
                    addr.map(|addr| (peer, addr))
                }
            })
            .buffer_unordered(ASKED_AT_ONCE)
            .filter_map(std::future::ready)
            .collect()
            .await
    }

    /// Tells the core of `key` the instances found now.
    fn discovered(self: &Arc<Self>, key: &str, found: &[(PeerId, SocketAddr)]) {
        let now = Instant::now();
        self.with_key(key, |core, actions| {
            for (peer, addr) in found {
                if !core.known().any(|known| known == peer) {
                    tracing::debug!(service = %key, %peer, %addr, "instance found");
                }
            }
            core.discovered(now, found, actions);
        });
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

    /// Asks allocators for an instance of the service and looks for it until it appears on
    /// the overlay; then tells the core how it went.
    async fn allocate(self: Arc<Self>, key: String, reason: Reason) {
        let Some((service, before)) = self.table().entries.get(&key).map(|entry| {
            let known: HashSet<PeerId> = entry.core.known().copied().collect();
            (Arc::clone(&entry.service), known)
        }) else {
            return;
        };
        let record = &service.record;
        let result = match ask_allocators(&self.node, record, reason, &self.unreachable).await {
            Ok((allocator, instance)) => {
                self.wait_for_new_instance(&key, &before)
                    .await
                    .map_err(|waited| AllocationError::NotAppeared {
                        allocator,
                        instance,
                        waited,
                    })
            }
            Err(error) => Err(error),
        };
        if let Err(error) = &result {
            tracing::warn!(service = %record.name, %error, "allocation failed");
        }
        self.metrics
            .allocation(&record.name, reason.label(), result.is_ok());
        let now = Instant::now();
        self.with_key(&key, |core, actions| {
            core.allocation_ended(reason, result, now, actions);
        });
    }

    /// Looks for the instances of `key` until one not in `before` appears (and tells the core
    /// each time); `Err` with the time waited when none did within the instance wait.
    async fn wait_for_new_instance(
        self: &Arc<Self>,
        key: &str,
        before: &HashSet<PeerId>,
    ) -> Result<(), Duration> {
        let waited = self.instance_wait;
        let give_up = tokio::time::Instant::now() + waited;
        // A sidecar advertises as soon as its service answers, usually within tens of
        // milliseconds of its start: look often at first, then back off.
        let mut pause = Duration::from_millis(10);
        loop {
            let found = self.discover(key).await;
            let appeared = found.iter().any(|(peer, _)| !before.contains(peer));
            if appeared {
                self.discovered(key, &found);
                return Ok(());
            }
            let now = tokio::time::Instant::now();
            if now >= give_up {
                return Err(waited);
            }
            tokio::time::sleep(pause.min(give_up - now)).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    /// Every service and its instances, for metrics.
    pub(super) fn view(&self) -> Vec<ServiceView> {
        let now = Instant::now();
        self.table()
            .entries
            .values_mut()
            .map(|entry| ServiceView {
                service: entry.service.record.name.clone(),
                instances: entry.core.report(now),
            })
            .collect()
    }
}
