//! The routing core of one service at the ingress: a pure state machine, as
//! `mtc_overlay::overlay::bootstrap` is for joining the overlay and quinn-proto is under quinn.
//! It does no I/O and reads no clock: the driver ([`super`]) passes the time, the randomness
//! and what happened, and carries out the [`Action`]s it returns (probe, discover, allocate,
//! wake waiting requests, check an instance's connection for silence, close it). The
//! simulator in `routing/tests.rs` drives it in virtual time.
//!
//! # Inputs
//! - the provider set found on the overlay ([`ServiceCore::discovered`]): it replaces what was
//!   known; an instance missing from two discoveries in a row, or from one while it is not
//!   answering, is forgotten with its metrics and connection;
//! - probe results, with the service health the sidecar reports ([`ServiceCore::probed`]);
//! - the typed outcome of each attempt ([`ServiceCore::attempt_ended`]): answered (network RTT
//!   and total time apart), refused by the sidecar (its service never saw the request), broken,
//!   timed out, cancelled, or the client's fault;
//! - an instance closing its connection to this proxy ([`ServiceCore::closed_by_peer`]: it
//!   shut down, as a culled instance does);
//! - whether the connection to an instance it suspects dead is silent
//!   ([`ServiceCore::silence_checked`]);
//! - allocation results ([`ServiceCore::allocation_ended`]) and ticks ([`ServiceCore::tick`]).
//!
//! # Rules
//! 1. **Network RTT, not service time.** Limits and the nearest-instance choice use network
//!    RTTs: the QUIC path RTT of the connection a request or probe went over (a probe's own
//!    round trip where that is less: the path estimate is smoothed). The time a service, or
//!    a sidecar on a loaded machine, takes to answer is kept apart per instance (for metrics
//!    and per-try timeouts) and never makes the ingress ask for a nearer instance.
//! 2. **Verified before used.** A new instance, and every instance after the service was quiet
//!    for `in-use-window`, is held out of the choice until a probe answers that its service is
//!    serving; requests wait for that (a round trip) rather than go to an instance that may be
//!    gone. A first probe that times out does not end the wait: the instance's connection is
//!    checked, and one whose QUIC stack answers (alive, on a loaded machine) is probed again
//!    and waited for, up to `verify-patience` from when it was found; one with no connection
//!    once its probe failed, or a silent one, is not waited for. An instance whose sidecar
//!    says its service is down (a probe, or a refused request) is held out until a probe says
//!    it serves again. So is one that closed its connection (it shut down, as when culled),
//!    and no request waits for it: with nothing else, an allocation starts at once.
//! 3. **No request left on a stalled instance.** Each attempt gets a per-try timeout:
//!    `try-factor` times the p99 of the instance's own recent request times, at least
//!    `try-floor`. An attempt past it makes the instance's RTT estimate at least the
//!    attempt's age (the chooser's unanswered-exchange bound) and gets the instance probed at
//!    once; the driver then sends an idempotent request a second time elsewhere (a hedge,
//!    within the retry budget) and takes the first answer. An instance that has not answered
//!    anything it was asked (a probe, which its sidecar answers without its service, or an
//!    overdue request since it became overdue) for the service's hard limit, at least
//!    `dead-floor`, has its connection checked for silence ([`Action::CheckSilent`]: the
//!    driver elicits an acknowledgement from the peer's QUIC stack). If nothing comes back it
//!    is declared dead: ejected, and its connection closed so that requests on it fail at
//!    once rather than after the QUIC idle timeout. If its transport answers, its sidecar is
//!    alive but busy: it keeps its connection and what is under way on it.
//! 4. **Probes cost nothing where traffic measures.** An instance is probed only when nothing
//!    answered from it for `probe-interval` and no request to it is under way (unless one
//!    is overdue), while the service is in use (`in-use-window`). An
//!    instance that keeps answering probes but gets no traffic is probed less and less often,
//!    up to `probe-idle-max`; one that does not answer is probed every
//!    `probe-interval` after its probe times out, so a thawed instance is back within about
//!    a second.
//! 5. **Allocation.** With no usable instance, one allocation is asked for (and requests wait
//!    for it, at most `max_waiting` of them); when the best instance is over the soft limit,
//!    a nearer one: from an allocator within the soft limit or at most half as far as the best
//!    instance ([`nearer_than`]), never one about as far. After an allocation fails the next of the
//!    same kind waits a cool-down, and after a nearer one succeeded the next nearer one
//!    ([`AllocationState`]); waiting requests look again at every tick.

use std::{
    collections::HashMap,
    fmt::Debug,
    hash::Hash,
    net::SocketAddr,
    time::{Duration, Instant},
};

use mtc_overlay::rtt::{RttWindow, WindowShape};

use super::allocation::{AllocationError, AllocationState, Begin, Reason};
use crate::{
    config::perf::{Limits, ServiceSettings, Tuning},
    framing::Health,
    select::{Chooser, InstanceView},
    transport::Silence,
};

/// Request times (network and service) kept per instance for its per-try timeout and its
/// service time: ten seconds in five slices.
const TIMES_WINDOW: WindowShape = WindowShape {
    slices: 5,
    slice: Duration::from_secs(2),
};
/// How long a computed per-try timeout is reused.
const TIMEOUT_REFRESH: Duration = Duration::from_millis(100);

/// What the driver does for the core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action<K> {
    /// Probe this instance (within `probe-timeout`) and report with
    /// [`ServiceCore::probed`].
    Probe(K, SocketAddr),
    /// Look for the service's instances and report with [`ServiceCore::discovered`].
    Discover,
    /// Ask allocators for an instance and report with [`ServiceCore::allocation_ended`].
    Allocate(Reason),
    /// Wake the requests waiting for this service: something they wait for changed.
    Wake,
    /// Find out whether the connection to this instance is silent (a live peer's QUIC stack
    /// acknowledges within a round trip and its ACK delay, however busy its sidecar is) and
    /// report with [`ServiceCore::silence_checked`].
    CheckSilent(K),
    /// Close the connection to this instance: it is dead or gone.
    Close(K),
}

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice<K> {
    /// To this instance; an answer not begun within `try_timeout` is overdue.
    Pick {
        key: K,
        addr: SocketAddr,
        try_timeout: Duration,
    },
    /// Nowhere yet: wait for a [`Action::Wake`] (an instance verified or found, an allocation
    /// ended), then choose again.
    Wait,
    /// Nowhere, and waiting would not help.
    Unavailable(Unavailable),
}

/// Why a request cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unavailable {
    #[error("no instance {known} and none could be started: {reason}")]
    AllocationFailed {
        known: Known,
        reason: AllocationError,
    },
    #[error("no instance is running and {0} requests already wait for one")]
    TooManyWaiting(usize),
}

/// How many instances are known, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Known(pub usize);

impl std::fmt::Display for Known {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            0 => write!(f, "is running"),
            n => write!(
                f,
                "of {n} known is usable (unverified, over the hard RTT limit, failing or down)"
            ),
        }
    }
}

/// How an attempt ended, as the driver saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A response head arrived: `network` is the connection's path RTT, `total` the time from
    /// sending to the head (so the service took about `total - network`).
    Answered { network: Duration, total: Duration },
    /// The sidecar says its service never saw the request (refused connection, or down).
    Refused,
    /// No connection, or the exchange broke.
    Failed,
    /// Dropped before it ended (another attempt answered first, or the client left).
    Cancelled,
    /// The client's own request body failed: says nothing of the instance.
    ClientFault,
}

impl Outcome {
    /// Answered `total` after sending, over a connection whose QUIC path RTT is `path`: the
    /// path RTT is the network's share, but never more than the whole exchange took (its
    /// smoothed estimate lags behind a path that got faster).
    pub fn answered(path: Duration, total: Duration) -> Self {
        Self::Answered {
            network: path.min(total),
            total,
        }
    }
}

/// What the core knows of one instance besides what the chooser knows.
#[derive(Debug)]
struct Instance {
    addr: SocketAddr,
    /// The last answer of any kind (probe or request).
    answered: Option<Instant>,
    /// The oldest exchange asked of it since that answer.
    asked_since: Option<Instant>,
    /// A probe is out.
    probing: bool,
    /// Requests under way to it.
    in_flight: u32,
    /// The next probe is due then (if nothing answers before).
    next_probe: Instant,
    /// Interval of the next idle probe (backs off while probes answer and traffic does not).
    idle_interval: Duration,
    /// Verified serving since it was found, or since the service was last quiet.
    verified: bool,
    /// Until then requests may wait for its verification; `None` once it could not be reached.
    awaited_until: Option<Instant>,
    /// Its sidecar says its service is down.
    down: bool,
    /// Its connection is being checked for silence.
    checking: bool,
    /// It closed its connection to this proxy (it shut down, as when culled): no request waits
    /// for it until it answers again.
    closed: bool,
    /// Discoveries in a row that did not list it.
    missing: u32,
    /// Whole request times (network and service), for the per-try timeout.
    times: RttWindow,
    /// Service times (request time less path RTT), for metrics.
    service_times: RttWindow,
    /// The per-try timeout and when it was computed.
    try_timeout: Option<(Instant, Duration)>,
}

impl Instance {
    fn new(addr: SocketAddr, tuning: &Tuning, now: Instant) -> Self {
        Self {
            addr,
            answered: None,
            asked_since: None,
            probing: false,
            in_flight: 0,
            next_probe: now,
            idle_interval: tuning.probe_interval,
            verified: false,
            awaited_until: Some(now + tuning.verify_patience),
            down: false,
            checking: false,
            closed: false,
            missing: 0,
            times: RttWindow::new(TIMES_WINDOW, now),
            service_times: RttWindow::new(TIMES_WINDOW, now),
            try_timeout: None,
        }
    }

    /// Requests may wait for it to be verified: it is being verified, and may yet answer.
    fn awaited(&self, now: Instant) -> bool {
        !self.verified && !self.down && !self.closed && self.awaited_until.is_some_and(|t| now < t)
    }

    fn answer(&mut self, now: Instant) {
        self.answered = Some(now);
        self.asked_since = None;
        self.closed = false;
    }

    fn asked(&mut self, since: Instant) {
        let oldest = self.asked_since.get_or_insert(since);
        *oldest = (*oldest).min(since);
    }

    /// Not answering: asked something a while ago and heard nothing since.
    fn silent_for(&self, now: Instant) -> Duration {
        self.asked_since
            .map_or(Duration::ZERO, |since| now.saturating_duration_since(since))
    }

    fn try_timeout(&mut self, tuning: &Tuning, now: Instant) -> Duration {
        if let Some((at, value)) = self.try_timeout
            && now.saturating_duration_since(at) < TIMEOUT_REFRESH
        {
            return value;
        }
        let value = match self.times.quantile(now, 0.99) {
            Some(p99) => (p99 * tuning.try_factor).max(tuning.try_floor),
            // A quiet spell keeps the last timeout.
            None => self
                .try_timeout
                .map_or(tuning.try_unknown, |(_, value)| value),
        };
        self.try_timeout = Some((now, value));
        value
    }
}

/// What the core knows of an instance, for metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceReport<K> {
    /// What the chooser knows of it: its key, RTT quantiles, requests in flight, ejection.
    pub view: InstanceView<K>,
    /// p50, p90 and p99 of its service times over the last ten seconds.
    pub service_time: Option<[Duration; 3]>,
    /// Its sidecar says its service is down.
    pub down: bool,
}

/// The routing state of one service.
#[derive(Debug)]
pub struct ServiceCore<K> {
    chooser: Chooser<K>,
    instances: HashMap<K, Instance>,
    /// When the last discovery ended, and whether one is running.
    discovered: Option<Instant>,
    discovering: bool,
    allocation: AllocationState,
    /// When the last request arrived (`None`: never).
    last_used: Option<Instant>,
    waiting: usize,
    max_waiting: usize,
    /// Its limits and tuning (perf.conf and its lookup record).
    settings: ServiceSettings,
}

/// The RTT an allocator must be under for an instance it starts to count as nearer than one
/// at `rtt`: within the soft limit, or at most half as far. An allocator about as far as the
/// instance (on the same machine, say) would only start a second instance just as far.
pub fn nearer_than(rtt: Duration, limits: Limits) -> Duration {
    limits.soft_rtt.max(rtt / 2)
}

/// How long an instance of a service routed with `settings` may answer nothing while asked
/// before its connection is checked for silence.
pub fn dead_after(settings: &ServiceSettings) -> Duration {
    settings.limits.hard_rtt.max(settings.tuning.dead_floor)
}

impl<K: Clone + Eq + Hash + Debug> ServiceCore<K> {
    /// At most `max_waiting` requests wait for instances at once; more are refused.
    pub fn new(settings: ServiceSettings, max_waiting: usize) -> Self {
        Self {
            chooser: Chooser::new(settings.tuning),
            instances: HashMap::new(),
            discovered: None,
            discovering: false,
            allocation: AllocationState::default(),
            last_used: None,
            waiting: 0,
            max_waiting,
            settings,
        }
    }

    /// The limits and tuning in use.
    pub fn settings(&self) -> &ServiceSettings {
        &self.settings
    }

    /// Routes with `settings` from now on (perf.conf was reloaded, or the service's record
    /// changed). What is known of the instances stays (see [`Chooser::retune`]); timers
    /// already set (the next probe, an ejection) run out as they were set.
    pub fn retune(&mut self, settings: ServiceSettings, now: Instant) {
        if settings != self.settings {
            self.chooser.retune(settings.tuning, now);
            self.settings = settings;
        }
    }

    /// The instances known.
    pub fn known(&self) -> impl Iterator<Item = &K> {
        self.instances.keys()
    }

    /// The instances known and their data-plane addresses.
    pub fn addresses(&self) -> impl Iterator<Item = (K, SocketAddr)> + '_ {
        self.instances
            .iter()
            .map(|(key, instance)| (key.clone(), instance.addr))
    }

    /// Chooses where a request goes. `arrived` is when the request arrived (an allocation
    /// that failed since is its answer), `avoid` an instance an earlier attempt of it failed
    /// on or is waiting on, `random(n)` a number below `n`.
    pub fn choose(
        &mut self,
        now: Instant,
        arrived: Instant,
        random: impl FnMut(usize) -> usize,
        avoid: Option<&K>,
        actions: &mut Vec<Action<K>>,
    ) -> Choice<K> {
        let limits = self.settings.limits;
        let quiet = !self.in_use(now);
        self.last_used = Some(now);
        if quiet {
            self.wake_from_quiet(now, actions);
        }
        self.refresh_if_due(now, actions);
        let decision = self.chooser.choose_avoiding(now, limits, random, avoid);
        if let Some(key) = decision.pick {
            if decision.want_nearer
                && let Some(rtt) = decision.pick_rtt
            {
                self.allocate(Reason::Nearer(nearer_than(rtt, limits)), now, actions);
            }
            let instance = self
                .instances
                .get_mut(&key)
                .expect("the chooser holds known instances only");
            return Choice::Pick {
                addr: instance.addr,
                try_timeout: instance.try_timeout(&self.settings.tuning, now),
                key,
            };
        }
        // Nothing usable. Instances being verified, or a discovery under way, may give one in
        // a round trip: wait for them before asking an allocator.
        let verifying = self.instances.values().any(|i| i.awaited(now));
        if verifying || self.discovering {
            return Choice::Wait;
        }
        if self.instances.is_empty() && self.discovery_due(now, self.settings.tuning.discover_retry)
        {
            self.discover(actions);
            return Choice::Wait;
        }
        if let Some(reason) = self.allocation.failure_since(arrived) {
            return self.failed(reason.clone());
        }
        match self.allocate(Reason::NoInstance, now, actions) {
            Begin::Failed(reason) => self.failed(reason),
            Begin::Start | Begin::Running | Begin::Recent => Choice::Wait,
        }
    }

    fn failed(&self, reason: AllocationError) -> Choice<K> {
        Choice::Unavailable(Unavailable::AllocationFailed {
            known: Known(self.instances.len()),
            reason,
        })
    }

    /// A request starts waiting (after [`Choice::Wait`]); `false` if too many already do, and
    /// it must be refused with [`Unavailable::TooManyWaiting`].
    pub fn start_waiting(&mut self) -> bool {
        if self.waiting >= self.max_waiting {
            return false;
        }
        self.waiting += 1;
        true
    }

    /// A request that waited stops waiting.
    pub fn stop_waiting(&mut self) {
        self.waiting = self.waiting.saturating_sub(1);
    }

    pub fn too_many_waiting(&self) -> Unavailable {
        Unavailable::TooManyWaiting(self.max_waiting)
    }

    /// After a quiet spell every instance is verified again before it is used: it may have
    /// been culled meanwhile. The list of instances is looked for again too.
    fn wake_from_quiet(&mut self, now: Instant, actions: &mut Vec<Action<K>>) {
        for (key, instance) in &mut self.instances {
            if instance.verified {
                instance.verified = false;
                self.chooser.hold(key, true);
            }
            instance.awaited_until = Some(now + self.settings.tuning.verify_patience);
            instance.idle_interval = self.settings.tuning.probe_interval;
            instance.next_probe = now;
        }
        if self.discovered.is_some() {
            self.discover(actions);
        }
        self.probe_due(now, actions);
    }

    fn discovery_due(&self, now: Instant, after: Duration) -> bool {
        !self.discovering
            && self
                .discovered
                .is_none_or(|at| now.saturating_duration_since(at) >= after)
    }

    fn discover(&mut self, actions: &mut Vec<Action<K>>) {
        if !self.discovering {
            self.discovering = true;
            actions.push(Action::Discover);
        }
    }

    fn refresh_if_due(&mut self, now: Instant, actions: &mut Vec<Action<K>>) {
        if !self.instances.is_empty()
            && self.discovery_due(now, self.settings.tuning.discover_interval)
        {
            self.discover(actions);
        }
    }

    fn allocate(&mut self, reason: Reason, now: Instant, actions: &mut Vec<Action<K>>) -> Begin {
        let begin = self.allocation.begin(reason, &self.settings.tuning, now);
        if begin == Begin::Start {
            actions.push(Action::Allocate(reason));
        }
        begin
    }

    /// The instances found on the overlay now. They replace those known: one missing from two
    /// discoveries in a row, or from one while it does not answer, is forgotten.
    pub fn discovered(
        &mut self,
        now: Instant,
        found: &[(K, SocketAddr)],
        actions: &mut Vec<Action<K>>,
    ) {
        self.discovering = false;
        self.discovered = Some(now);
        let mut gone = Vec::new();
        for (key, instance) in &mut self.instances {
            if found.iter().any(|(k, _)| k == key) {
                instance.missing = 0;
                continue;
            }
            instance.missing += 1;
            let failing = instance.down
                || instance.closed
                || instance.silent_for(now) >= self.settings.tuning.probe_timeout;
            if instance.missing >= 2 || failing || !instance.verified {
                gone.push(key.clone());
            }
        }
        for key in gone {
            self.forget(&key, actions);
        }
        let mut new = false;
        for (key, addr) in found {
            match self.instances.get_mut(key) {
                Some(instance) => instance.addr = *addr,
                None => {
                    self.instances.insert(
                        key.clone(),
                        Instance::new(*addr, &self.settings.tuning, now),
                    );
                    self.chooser.add(key.clone(), now);
                    self.chooser.hold(key, true);
                    new = true;
                }
            }
        }
        if new {
            self.probe_due(now, actions);
        }
        // Waiting requests look again: at new instances, or at the allocation to ask for.
        actions.push(Action::Wake);
    }

    fn forget(&mut self, key: &K, actions: &mut Vec<Action<K>>) {
        if self.instances.remove(key).is_some() {
            self.chooser.remove(key);
            actions.push(Action::Close(key.clone()));
        }
    }

    /// A probe of `key` ended: answered, with the network RTT it measured (rule 1; a
    /// handshake before it is not path RTT) and the health the sidecar reports, or not
    /// (`None`: failed or timed out).
    pub fn probed(
        &mut self,
        key: &K,
        now: Instant,
        answer: Option<(Duration, Health)>,
        actions: &mut Vec<Action<K>>,
    ) {
        let Some(instance) = self.instances.get_mut(key) else {
            return;
        };
        instance.probing = false;
        match answer {
            Some((rtt, health)) => {
                instance.answer(now);
                self.chooser.answered(key);
                self.chooser.record_rtt(key, rtt, now);
                self.chooser.outcome(key, true, now);
                let was_usable = instance.verified && !instance.down;
                instance.down = health == Health::Down;
                instance.verified = true;
                self.chooser.hold(key, instance.down);
                instance.next_probe = now + instance.idle_interval;
                instance.idle_interval =
                    (instance.idle_interval * 2).min(self.settings.tuning.probe_idle_max);
                if !was_usable && !instance.down {
                    actions.push(Action::Wake);
                }
            }
            None => {
                self.chooser.outcome(key, false, now);
                instance.idle_interval = self.settings.tuning.probe_interval;
                instance.next_probe = now + self.settings.tuning.probe_interval;
                if instance.awaited(now) {
                    // Not answering yet: whether it can, its connection tells.
                    if !instance.checking {
                        instance.checking = true;
                        actions.push(Action::CheckSilent(key.clone()));
                    }
                } else {
                    self.check_if_silent(key, now, actions);
                }
            }
        }
    }

    /// `key` closed its connection to this proxy: its proxy shut down (culled, stopped) or
    /// restarted. It is out of the choice, and no request waits for it, until it answers a
    /// probe again; it is forgotten once discovery no longer lists it.
    pub fn closed_by_peer(&mut self, key: &K, now: Instant, actions: &mut Vec<Action<K>>) {
        let Some(instance) = self.instances.get_mut(key) else {
            return;
        };
        instance.closed = true;
        instance.verified = false;
        instance.next_probe = now + self.settings.tuning.probe_interval;
        instance.idle_interval = self.settings.tuning.probe_interval;
        self.chooser.hold(key, true);
        // Requests waiting may now ask for an allocation rather than wait for it.
        actions.push(Action::Wake);
    }

    /// A request to `key` starts now.
    pub fn attempt_started(&mut self, key: &K, now: Instant) {
        if let Some(instance) = self.instances.get_mut(key) {
            instance.in_flight += 1;
        }
        self.chooser.start(key, now);
    }

    /// An attempt on `key`, started at `started`, passed its per-try timeout without an
    /// answer: the instance's RTT is at least that old from now on, and it is probed at once.
    pub fn attempt_overdue(
        &mut self,
        key: &K,
        started: Instant,
        now: Instant,
        actions: &mut Vec<Action<K>>,
    ) {
        let Some(instance) = self.instances.get_mut(key) else {
            return;
        };
        // Silent from now, not from the start: a slow service is not a silent instance. The
        // probe sent now is what a live sidecar answers.
        instance.asked(now);
        self.chooser.unanswered(key, started);
        instance.next_probe = now;
        instance.idle_interval = self.settings.tuning.probe_interval;
        self.probe_due(now, actions);
    }

    /// An attempt on `key`, started at `started`, ended with `outcome`.
    pub fn attempt_ended(
        &mut self,
        key: &K,
        started: Instant,
        now: Instant,
        outcome: Outcome,
        actions: &mut Vec<Action<K>>,
    ) {
        let Some(instance) = self.instances.get_mut(key) else {
            return;
        };
        instance.in_flight = instance.in_flight.saturating_sub(1);
        match outcome {
            Outcome::Answered { network, total } => {
                instance.answer(now);
                instance.idle_interval = self.settings.tuning.probe_interval;
                instance.next_probe = now + self.settings.tuning.probe_interval;
                instance.times.record(now, total);
                instance
                    .service_times
                    .record(now, total.saturating_sub(network));
                self.chooser.answered(key);
                self.chooser.finish(key, true, now);
                self.chooser.record_rtt(key, network, now);
            }
            Outcome::Refused => {
                // The sidecar answered, its service did not: out until a probe says it serves.
                instance.answer(now);
                instance.down = true;
                instance.next_probe = now + self.settings.tuning.probe_interval;
                self.chooser.answered(key);
                self.chooser.hold(key, true);
                self.chooser.finish(key, false, now);
            }
            Outcome::Failed => {
                instance.asked(started);
                instance.next_probe = now;
                self.chooser.finish(key, false, now);
                self.probe_due(now, actions);
                self.check_if_silent(key, now, actions);
            }
            Outcome::Cancelled | Outcome::ClientFault => self.chooser.release(key),
        }
    }

    /// Has the connection to `key` checked for silence if it answered nothing for
    /// `dead_after`.
    fn check_if_silent(&mut self, key: &K, now: Instant, actions: &mut Vec<Action<K>>) {
        let Some(instance) = self.instances.get_mut(key) else {
            return;
        };
        if instance.silent_for(now) >= dead_after(&self.settings)
            && !instance.checking
            && !self.chooser.is_ejected(key, now)
        {
            instance.checking = true;
            actions.push(Action::CheckSilent(key.clone()));
        }
    }

    /// The connection to `key` was checked. A silent instance is dead: ejected, and its
    /// connection closed so that requests on it fail now rather than at the idle timeout. One
    /// whose transport answers is alive but slow: it keeps its connection (and what is under
    /// way on it), its silence counts anew, and if it is being verified it is probed again at
    /// once. One being verified that is silent, or has no connection after its probe failed,
    /// is not waited for.
    pub fn silence_checked(
        &mut self,
        key: &K,
        silence: Silence,
        now: Instant,
        actions: &mut Vec<Action<K>>,
    ) {
        let Some(instance) = self.instances.get_mut(key) else {
            return;
        };
        instance.checking = false;
        if instance.asked_since.is_none() {
            // It answered while its connection was checked.
            return;
        }
        let awaited = instance.awaited(now);
        // With no connection while its probe is out, the probe is still setting one up (a
        // few round trips): that is no reason to stop waiting; after its probe failed it is.
        let unreachable = match silence {
            Silence::Heard => false,
            Silence::Silent => true,
            Silence::Unconnected => !instance.probing,
        };
        if awaited && unreachable {
            instance.awaited_until = None;
            actions.push(Action::Wake);
        }
        match silence {
            Silence::Heard | Silence::Unconnected => {
                instance.asked_since = Some(now);
                if awaited && silence == Silence::Heard {
                    instance.next_probe = now;
                    self.probe_due(now, actions);
                }
            }
            Silence::Silent => {
                for _ in 0..self.settings.tuning.eject_after {
                    self.chooser.outcome(key, false, now);
                }
                actions.push(Action::Close(key.clone()));
            }
        }
    }

    /// An allocation asked for `reason` ended.
    pub fn allocation_ended(
        &mut self,
        reason: Reason,
        result: Result<(), AllocationError>,
        now: Instant,
        actions: &mut Vec<Action<K>>,
    ) {
        self.allocation.end(reason, result, now);
        actions.push(Action::Wake);
    }

    /// Whether the service served a request within `in-use-window` of `now`: a core that is
    /// not in use does nothing at a tick but look for instances that went away, at most every
    /// `discover-interval`, so its driver may tick it less often.
    pub fn in_use(&self, now: Instant) -> bool {
        self.last_used.is_some_and(|at| {
            now.saturating_duration_since(at) < self.settings.tuning.in_use_window
        })
    }

    /// Time passes: probes that are due, a refresh of the instance list, dead instances.
    pub fn tick(&mut self, now: Instant, actions: &mut Vec<Action<K>>) {
        if !self.in_use(now) {
            // Quiet: nothing is probed, but instances that went away (culled) are looked for
            // until discovery no longer lists them, so that they leave the metrics too.
            if self.instances.values().any(|i| i.closed) {
                self.refresh_if_due(now, actions);
            }
            return;
        }
        self.refresh_if_due(now, actions);
        self.probe_due(now, actions);
        if self.waiting > 0 {
            // Waiting requests look again: a cool-down may have ended, an instance timed out.
            actions.push(Action::Wake);
        }
        let silent: Vec<K> = self
            .instances
            .iter()
            .filter(|(_, i)| i.silent_for(now) >= dead_after(&self.settings))
            .map(|(k, _)| k.clone())
            .collect();
        for key in silent {
            self.check_if_silent(&key, now, actions);
        }
    }

    /// Probes every instance that is due and has none out. Requests under way and not
    /// overdue measure an instance as well as a probe would: it is not probed meanwhile.
    fn probe_due(&mut self, now: Instant, actions: &mut Vec<Action<K>>) {
        for (key, instance) in &mut self.instances {
            let measured_by_requests = instance.in_flight > 0 && instance.asked_since.is_none();
            if instance.probing || now < instance.next_probe || measured_by_requests {
                continue;
            }
            instance.probing = true;
            instance.asked(now);
            self.chooser.probe_sent(key, now);
            actions.push(Action::Probe(key.clone(), instance.addr));
        }
    }

    /// Every instance, for metrics.
    pub fn report(&mut self, now: Instant) -> Vec<InstanceReport<K>> {
        let views = self.chooser.view(now);
        views
            .into_iter()
            .map(|view| {
                let instance = self.instances.get_mut(&view.key);
                let (service_time, down) = match instance {
                    Some(i) => (
                        i.service_times.summary(now).map(|s| [s.p50, s.p90, s.p99]),
                        i.down,
                    ),
                    None => (None, false),
                };
                InstanceReport {
                    view,
                    service_time,
                    down,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
