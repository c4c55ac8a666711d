//! A simulator: the core driven in virtual time against a world of instances that can be
//! slow, frozen, dead, culled or down, with the driver's rules (hedge an overdue idempotent
//! request within the retry budget, wait for a wake-up up to a deadline) played by the
//! simulator itself. Every scenario runs in milliseconds.

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BinaryHeap, HashMap},
    net::{IpAddr, Ipv4Addr},
};

use super::*;
use crate::{
    config::perf::{DEFAULT_LIMITS, Policy, ServiceSettings},
    retry::RetryBudget,
    transport::MIN_SILENCE,
};

const MS: Duration = Duration::from_millis(1);
const T: Tuning = Tuning::DEFAULT;
const SECOND: Duration = Duration::from_secs(1);
/// How long a request waits for an instance, as the ingress's --instance-wait.
const INSTANCE_WAIT: Duration = Duration::from_secs(15);
/// How long an allocator takes to start an instance that then advertises itself.
const START_TIME: Duration = Duration::from_millis(150);
/// How long a discovery takes.
const DISCOVERY_TIME: Duration = Duration::from_millis(5);
/// Round trips before a new connection carries a probe: QUIC's handshake and the proofs of
/// the network key.
const HANDSHAKE_ROUND_TRIPS: u32 = 2;

type Key = &'static str;

/// One instance of the simulated world.
#[derive(Debug, Clone)]
struct Behaviour {
    rtt: Duration,
    /// Each way, a delay up to this is added (uniformly at random), as `bench tiers`' relays
    /// add it: round trips from `rtt` to `rtt + 2 * jitter`, most near `rtt + jitter`.
    jitter: Duration,
    /// The state of the jitter's random numbers (xorshift).
    jitter_state: std::cell::Cell<u64>,
    service: Duration,
    /// Periods during which the whole instance (sidecar and service) is frozen.
    frozen: Vec<(Instant, Instant)>,
    /// Periods during which its sidecar answers nothing but its QUIC stack still acknowledges
    /// what it is sent, as on a machine too loaded to run the sidecar's tasks in time.
    stalled: Vec<(Instant, Instant)>,
    /// From then on its service refuses connections; its sidecar answers.
    service_dead_from: Option<Instant>,
    /// From then on it is gone (culled): nothing answers.
    gone_from: Option<Instant>,
    /// Before then it is not found on the overlay (started later, by someone else).
    listed_from: Option<Instant>,
    /// From then on it is no longer found on the overlay.
    unlisted_from: Option<Instant>,
}

impl Behaviour {
    fn new(rtt_ms: u64, service_ms: u64) -> Self {
        Self {
            rtt: MS * rtt_ms as u32,
            jitter: Duration::ZERO,
            jitter_state: std::cell::Cell::new(0x9e37_79b9_7f4a_7c15),
            service: MS * service_ms as u32,
            frozen: Vec::new(),
            stalled: Vec::new(),
            service_dead_from: None,
            gone_from: None,
            listed_from: None,
            unlisted_from: None,
        }
    }

    fn gone(&self, at: Instant) -> bool {
        self.gone_from.is_some_and(|from| at >= from)
    }

    /// Whether its QUIC stack acknowledges nothing at `at`.
    fn transport_silent(&self, at: Instant) -> bool {
        self.gone(at) || self.frozen.iter().any(|&(from, to)| from <= at && at < to)
    }

    /// The same path with up to `jitter_ms` added each way.
    fn with_jitter(mut self, jitter_ms: u64) -> Self {
        self.jitter = MS * jitter_ms as u32;
        self
    }

    /// One round trip of its path: the RTT and the jitter of each way.
    fn round_trip(&self) -> Duration {
        let way = || {
            let mut x = self.jitter_state.get();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.jitter_state.set(x);
            self.jitter.mul_f64((x % 1024) as f64 / 1024.0)
        };
        self.rtt + way() + way()
    }

    /// When something sent at `sent` that takes `work` at the instance is answered, and the
    /// round trip of the network in that: `None` if never. A freeze or a stall holds
    /// whatever is under way until it ends.
    fn answer_at(&self, sent: Instant, work: Duration) -> Option<(Instant, Duration)> {
        let rtt = self.round_trip();
        let mut at = sent + rtt + work;
        for &(from, to) in self.frozen.iter().chain(&self.stalled) {
            if from < at && to > sent {
                at += to - from.max(sent);
            }
        }
        (!self.gone(sent) && !self.gone(at)).then_some((at, rtt))
    }
}

#[derive(Debug)]
enum Event {
    Arrive(usize),
    Tick,
    Deadline(usize),
    ProbeDone(Key, Instant, Option<Health>),
    AttemptDone(usize, Outcome),
    Overdue(usize),
    Discovered,
    AllocationDone(Reason),
    /// The instance's proxy closed its connection (it shut down).
    Closed(Key),
    /// A connection to the instance is open (its handshake ended).
    Connected(Key),
    /// The check of the connection to the instance ended.
    SilenceChecked(Key, Silence),
    /// The path to the instance changes: its round trip is this from now on.
    PathChanged(Key, Duration),
}

#[derive(Debug)]
struct Attempt {
    request: usize,
    key: Key,
    started: Instant,
    live: bool,
}

/// Why a simulated request failed, as the driver would answer it.
#[derive(Debug, Clone, thiserror::Error)]
enum Failure {
    #[error("no instance became available")]
    WaitedTooLong,
    #[error(transparent)]
    Unavailable(#[from] Unavailable),
    #[error("{0}: refused")]
    Refused(Key),
    #[error("{0}: failed")]
    Failed(Key),
}

#[derive(Debug, Default)]
struct Request {
    arrived: Option<Instant>,
    replayable: bool,
    /// Attempts under way.
    attempts: Vec<usize>,
    waiting: bool,
    tries: u32,
    done: Option<(Instant, Result<Key, Failure>)>,
}

struct Sim {
    now: Instant,
    start: Instant,
    core: ServiceCore<Key>,
    world: BTreeMap<Key, Behaviour>,
    /// What an allocator starts, under which name, and whether it refuses.
    allocations: Vec<Key>,
    allocatable: Vec<(Key, Behaviour)>,
    allocator_refuses: bool,
    /// Allocations asked for, and why.
    asked: usize,
    reasons: Vec<Reason>,
    budget: RetryBudget,
    events: BinaryHeap<Reverse<(Instant, u64, usize)>>,
    payloads: HashMap<u64, Event>,
    sequence: u64,
    requests: Vec<Request>,
    attempts: Vec<Attempt>,
    probes: usize,
    random: u64,
    /// Instances with an open connection: one is opened by a probe or a request to an
    /// instance whose transport answers, and lost when closed.
    connected: std::collections::HashSet<Key>,
}

fn addr(key: Key) -> SocketAddr {
    let port = key.bytes().fold(1000u16, |a, b| {
        a.wrapping_mul(31).wrapping_add(u16::from(b))
    });
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
}

impl Sim {
    fn new(world: &[(Key, Behaviour)]) -> Self {
        let now = Instant::now();
        let mut sim = Self {
            now,
            start: now,
            core: ServiceCore::new(ServiceSettings::default(), 1024),
            world: world.iter().cloned().collect(),
            allocations: Vec::new(),
            allocatable: Vec::new(),
            allocator_refuses: false,
            asked: 0,
            reasons: Vec::new(),
            budget: RetryBudget::default(),
            events: BinaryHeap::new(),
            payloads: HashMap::new(),
            sequence: 0,
            requests: Vec::new(),
            attempts: Vec::new(),
            probes: 0,
            random: 0x2545_f491_4f6c_dd1d,
            connected: Default::default(),
        };
        sim.at(now, Event::Tick);
        sim
    }

    fn t(&self, offset: Duration) -> Instant {
        self.start + offset
    }

    fn at(&mut self, when: Instant, event: Event) {
        self.sequence += 1;
        self.payloads.insert(self.sequence, event);
        self.events.push(Reverse((when, self.sequence, 0)));
    }

    /// Requests at `rate` per second from `from` for `length`, idempotent or not.
    /// At `after` from the start, the path to `key` takes `rtt` a round trip.
    fn change_path(&mut self, after: Duration, key: Key, rtt: Duration) {
        let when = self.start + after;
        self.at(when, Event::PathChanged(key, rtt));
    }

    fn load(&mut self, from: Duration, length: Duration, rate: u32, replayable: bool) {
        let gap = SECOND / rate;
        let mut offset = from;
        while offset < from + length {
            let id = self.requests.len();
            self.requests.push(Request {
                replayable,
                ..Request::default()
            });
            self.at(self.start + offset, Event::Arrive(id));
            offset += gap;
        }
    }

    /// Runs every event up to `until`.
    fn run_until(&mut self, until: Duration) {
        let until = self.start + until;
        while let Some(Reverse((when, sequence, _))) = self.events.peek().copied() {
            if when > until {
                break;
            }
            self.events.pop();
            self.now = when;
            let event = self
                .payloads
                .remove(&sequence)
                .expect("every event has a payload");
            self.handle(event);
        }
        self.now = until;
    }

    fn handle(&mut self, event: Event) {
        let now = self.now;
        let mut actions = Vec::new();
        match event {
            Event::Arrive(id) => {
                self.requests[id].arrived = Some(now);
                self.at(now + INSTANCE_WAIT, Event::Deadline(id));
                self.route(id, None, &mut actions);
            }
            Event::Tick => {
                self.core.tick(now, &mut actions);
                self.at(now + 10 * MS, Event::Tick);
            }
            Event::Deadline(id) => {
                let request = &mut self.requests[id];
                if request.done.is_none() && request.waiting {
                    request.waiting = false;
                    self.core.stop_waiting();
                    self.finish(id, Err(Failure::WaitedTooLong));
                }
            }
            Event::ProbeDone(key, sent, answer) => {
                // As the driver reports it: the probe's round trip, or the connection's QUIC
                // path RTT if less (a sidecar slow to answer does not make the path longer).
                let path = self.world[key].rtt;
                let answer = answer.map(|health| ((now - sent).min(path), health));
                self.core.probed(&key, now, answer, &mut actions);
            }
            Event::AttemptDone(attempt, outcome) => {
                self.attempt_done(attempt, outcome, &mut actions)
            }
            Event::Overdue(attempt) => {
                let Attempt {
                    request,
                    key,
                    started,
                    live,
                } = self.attempts[attempt];
                if !live {
                    return;
                }
                self.core.attempt_overdue(&key, started, now, &mut actions);
                let req = &self.requests[request];
                if req.replayable && req.attempts.len() == 1 && self.budget.withdraw() {
                    self.route(request, Some(key), &mut actions);
                }
            }
            Event::Closed(key) => self.core.closed_by_peer(&key, now, &mut actions),
            Event::Connected(key) => {
                self.connected.insert(key);
            }
            Event::PathChanged(key, rtt) => {
                if let Some(behaviour) = self.world.get_mut(key) {
                    behaviour.rtt = rtt;
                }
            }
            Event::SilenceChecked(key, silence) => {
                self.core.silence_checked(&key, silence, now, &mut actions)
            }
            Event::Discovered => {
                let found = self.listed();
                self.core.discovered(now, &found, &mut actions);
            }
            Event::AllocationDone(reason) => {
                let result = if self.allocator_refuses || self.allocatable.is_empty() {
                    Err(AllocationError::Refused(Vec::new()))
                } else {
                    let (key, behaviour) = self.allocatable.remove(0);
                    self.world.insert(key, behaviour);
                    self.allocations.push(key);
                    // As the driver does: looks until the new instance is found.
                    let found = self.listed();
                    self.core.discovered(now, &found, &mut actions);
                    Ok(())
                };
                self.core
                    .allocation_ended(reason, result, now, &mut actions);
            }
        }
        self.perform(actions);
    }

    /// The instances found on the overlay now.
    fn listed(&self) -> Vec<(Key, SocketAddr)> {
        self.world
            .iter()
            .filter(|(_, b)| b.listed_from.is_none_or(|from| self.now >= from))
            .filter(|(_, b)| b.unlisted_from.is_none_or(|from| self.now < from))
            .map(|(k, _)| (*k, addr(k)))
            .collect()
    }

    fn attempt_done(&mut self, attempt: usize, outcome: Outcome, actions: &mut Vec<Action<Key>>) {
        let Attempt {
            request,
            key,
            started,
            live,
        } = self.attempts[attempt];
        if !live {
            return;
        }
        self.attempts[attempt].live = false;
        self.requests[request].attempts.retain(|a| *a != attempt);
        self.core
            .attempt_ended(&key, started, self.now, outcome.clone(), actions);
        if self.requests[request].done.is_some() {
            return;
        }
        match outcome {
            Outcome::Answered { .. } => {
                // The first answer wins; the other attempt is dropped.
                for other in std::mem::take(&mut self.requests[request].attempts) {
                    self.attempts[other].live = false;
                    let (k, s) = (self.attempts[other].key, self.attempts[other].started);
                    self.core
                        .attempt_ended(&k, s, self.now, Outcome::Cancelled, actions);
                }
                self.finish(request, Ok(key));
            }
            _ if !self.requests[request].attempts.is_empty() => {} // the other may answer
            Outcome::Refused => {
                if self.requests[request].replayable && self.budget.withdraw() {
                    self.route(request, Some(key), actions);
                } else {
                    self.finish(request, Err(Failure::Refused(key)));
                }
            }
            _ => {
                if self.requests[request].replayable && self.budget.withdraw() {
                    self.route(request, Some(key), actions);
                } else {
                    self.finish(request, Err(Failure::Failed(key)));
                }
            }
        }
    }

    fn finish(&mut self, id: usize, result: Result<Key, Failure>) {
        self.requests[id].done = Some((self.now, result));
    }

    /// What the driver does with a request: choose, then send or wait.
    fn route(&mut self, id: usize, avoid: Option<Key>, actions: &mut Vec<Action<Key>>) {
        let now = self.now;
        let arrived = self.requests[id].arrived.expect("arrived");
        let mut random = std::mem::take(&mut self.random);
        let choice = {
            let mut next = |n: usize| {
                random ^= random << 13;
                random ^= random >> 7;
                random ^= random << 17;
                (random % n as u64) as usize
            };
            self.core
                .choose(now, arrived, &mut next, avoid.as_ref(), actions)
        };
        self.random = random;
        let request = &mut self.requests[id];
        match choice {
            Choice::Pick {
                key, try_timeout, ..
            } => {
                if request.waiting {
                    request.waiting = false;
                    self.core.stop_waiting();
                }
                request.tries += 1;
                let attempt = self.attempts.len();
                request.attempts.push(attempt);
                self.attempts.push(Attempt {
                    request: id,
                    key,
                    started: now,
                    live: true,
                });
                self.core.attempt_started(&key, now);
                let behaviour = &self.world[key];
                if !behaviour.transport_silent(now) {
                    self.connected.insert(key);
                }
                let outcome = match behaviour.service_dead_from {
                    Some(from) if now >= from => behaviour
                        .answer_at(now, Duration::ZERO)
                        .map(|(at, _)| (at, Outcome::Refused)),
                    // As the driver reports it: the connection's QUIC path RTT, smoothed (the
                    // path's mean round trip rather than this request's).
                    _ => behaviour.answer_at(now, behaviour.service).map(|(at, _)| {
                        (
                            at,
                            Outcome::answered(behaviour.rtt + behaviour.jitter, at - now),
                        )
                    }),
                };
                if let Some((at, outcome)) = outcome {
                    self.at(at, Event::AttemptDone(attempt, outcome));
                }
                self.at(now + try_timeout, Event::Overdue(attempt));
            }
            Choice::Wait => {
                if !request.waiting {
                    if !self.core.start_waiting() {
                        let refused = self.core.too_many_waiting();
                        self.finish(id, Err(refused.into()));
                        return;
                    }
                    self.requests[id].waiting = true;
                }
            }
            Choice::Unavailable(why) => {
                if request.waiting {
                    request.waiting = false;
                    self.core.stop_waiting();
                }
                self.finish(id, Err(why.into()));
            }
        }
    }

    fn perform(&mut self, actions: Vec<Action<Key>>) {
        let now = self.now;
        for action in actions {
            match action {
                Action::Probe(key, _) => {
                    self.probes += 1;
                    let behaviour = self.world[key].clone();
                    // Without a connection, the probe waits for a handshake (and the proofs of
                    // the network key) first: it is sent once the connection is open.
                    let sent = if self.connected.contains(key) {
                        now
                    } else {
                        now + behaviour.rtt * HANDSHAKE_ROUND_TRIPS
                    };
                    if !behaviour.transport_silent(now) {
                        self.at(sent, Event::Connected(key));
                    }
                    let answer = behaviour
                        .answer_at(sent, Duration::ZERO)
                        .map(|(at, _)| at)
                        .filter(|at| *at - now < T.probe_timeout);
                    let health = match behaviour.service_dead_from {
                        Some(from) if now >= from => Health::Down,
                        _ => Health::Serving,
                    };
                    match answer {
                        Some(at) => self.at(at, Event::ProbeDone(key, sent, Some(health))),
                        None => self.at(now + T.probe_timeout, Event::ProbeDone(key, sent, None)),
                    }
                }
                Action::Discover => self.at(now + DISCOVERY_TIME, Event::Discovered),
                Action::Allocate(reason) => {
                    self.asked += 1;
                    self.reasons.push(reason);
                    self.at(now + START_TIME, Event::AllocationDone(reason));
                }
                Action::Wake => {
                    let waiting: Vec<usize> = (0..self.requests.len())
                        .filter(|&id| self.requests[id].waiting && self.requests[id].done.is_none())
                        .collect();
                    for id in waiting {
                        let mut more = Vec::new();
                        self.route(id, None, &mut more);
                        self.perform(more);
                    }
                }
                Action::CheckSilent(key) => {
                    // As `Transport::check_silence` does on loopback: has nothing to judge
                    // without a connection (at once), else waits its shortest time.
                    let behaviour = &self.world[key];
                    let end = now + MIN_SILENCE;
                    let (at, silence) = if !self.connected.contains(key) {
                        (now, Silence::Unconnected)
                    } else if behaviour.transport_silent(now) && behaviour.transport_silent(end) {
                        (end, Silence::Silent)
                    } else {
                        (end, Silence::Heard)
                    };
                    self.at(at, Event::SilenceChecked(key, silence));
                }
                Action::Close(key) => {
                    self.connected.remove(key);
                    // Requests on a closed connection fail at once.
                    let on_it: Vec<usize> = (0..self.attempts.len())
                        .filter(|&a| self.attempts[a].live && self.attempts[a].key == key)
                        .collect();
                    for attempt in on_it {
                        self.at(now, Event::AttemptDone(attempt, Outcome::Failed));
                    }
                }
            }
        }
    }

    /// Requests that arrived in `[from, to)` of the run: (failed, slowest, share by instance).
    fn stats(&self, from: Duration, to: Duration) -> Stats {
        let mut stats = Stats::default();
        for request in &self.requests {
            let Some(arrived) = request.arrived else {
                continue;
            };
            if arrived < self.start + from || arrived >= self.start + to {
                continue;
            }
            match &request.done {
                Some((done, Ok(key))) => {
                    stats.slowest = stats.slowest.max(*done - arrived);
                    *stats.served.entry(key).or_default() += 1;
                }
                Some((_, Err(error))) => stats.failed.push(error.to_string()),
                None => stats.failed.push("never answered".into()),
            }
        }
        stats
    }
}

#[derive(Debug, Default)]
struct Stats {
    failed: Vec<String>,
    slowest: Duration,
    served: BTreeMap<&'static str, usize>,
}

impl Stats {
    fn share(&self, key: Key) -> f64 {
        let total: usize = self.served.values().sum();
        self.served.get(key).copied().unwrap_or(0) as f64 / total.max(1) as f64
    }
}

fn tiers() -> Vec<(Key, Behaviour)> {
    vec![
        ("edge", Behaviour::new(1, 0)),
        ("metro", Behaviour::new(20, 0)),
        ("cloud", Behaviour::new(40, 0)),
    ]
}

#[test]
fn three_tiers_send_nearly_everything_to_the_edge() {
    let mut sim = Sim::new(&tiers());
    sim.load(Duration::ZERO, 10 * SECOND, 100, true);
    sim.run_until(12 * SECOND);
    let stats = sim.stats(SECOND, 10 * SECOND);
    assert!(stats.failed.is_empty(), "{:?}", stats.failed);
    assert!(stats.share("edge") >= 0.95, "{stats:?}");
    assert!(sim.allocations.is_empty());
}

/// perf.conf reloaded under load: the core takes the new tuning in place. What it measured
/// under round robin routes at once under the RTT policy: nothing is verified or measured
/// again, nothing fails, nothing waits.
#[test]
fn a_retune_applies_at_the_next_choice_and_keeps_what_was_measured() {
    let mut sim = Sim::new(&tiers());
    let round_robin = ServiceSettings {
        limits: DEFAULT_LIMITS,
        tuning: Tuning {
            policy: Policy::RoundRobin,
            ..T
        },
    };
    sim.core.retune(round_robin, sim.now);
    sim.load(Duration::ZERO, 8 * SECOND, 100, true);
    sim.run_until(4 * SECOND);
    let before = sim.stats(SECOND, 4 * SECOND);
    assert!(
        (0.25..0.42).contains(&before.share("edge")),
        "round robin: {before:?}"
    );
    sim.core.retune(ServiceSettings::default(), sim.now);
    sim.run_until(10 * SECOND);
    let after = sim.stats(4 * SECOND, 8 * SECOND);
    assert!(after.failed.is_empty(), "{:?}", after.failed);
    assert!(after.share("edge") >= 0.97, "after the retune: {after:?}");
    assert!(after.slowest <= 50 * MS, "{after:?}");
    assert!(sim.allocations.is_empty());
}

/// Two instances whose paths swap (the near one becomes the far one): within 2 s the traffic
/// follows, and nothing fails or waits on the way. (Was a timed integration test; the data
/// plane test now checks only that traffic moves.)
#[test]
fn traffic_follows_a_change_of_paths_within_two_seconds() {
    let mut sim = Sim::new(&[("a", Behaviour::new(1, 0)), ("b", Behaviour::new(21, 0))]);
    sim.change_path(10 * SECOND, "a", 21 * MS);
    sim.change_path(10 * SECOND, "b", MS);
    sim.load(Duration::ZERO, 20 * SECOND, 100, true);
    sim.run_until(22 * SECOND);
    let before = sim.stats(SECOND, 10 * SECOND);
    assert!(before.share("a") >= 0.95, "before: {before:?}");
    let after = sim.stats(12 * SECOND, 20 * SECOND);
    assert!(after.failed.is_empty(), "{:?}", after.failed);
    assert!(after.share("b") >= 0.95, "2 s after the swap: {after:?}");
    assert!(sim.allocations.is_empty(), "{:?}", sim.allocations);
}

#[test]
fn a_frozen_instance_holds_no_request_past_the_hard_limit_and_gets_traffic_back_after_it_thaws() {
    let mut world = tiers();
    let (freeze, thaw) = (5 * SECOND, 35 * SECOND);
    let start = Instant::now();
    let mut sim = Sim::new(&[]);
    world[0].1.frozen.push((start + freeze, start + thaw));
    sim.start = start;
    sim.now = start;
    sim.world = world.into_iter().collect();
    sim.load(Duration::ZERO, 40 * SECOND, 200, true);
    sim.run_until(42 * SECOND);
    let during = sim.stats(freeze, thaw);
    assert!(
        during.failed.is_empty(),
        "{:?}",
        &during.failed[..during.failed.len().min(5)]
    );
    assert!(
        during.slowest <= DEFAULT_LIMITS.hard_rtt,
        "slowest {:?} with the edge frozen",
        during.slowest
    );
    let after = sim.stats(thaw + 2 * SECOND, 40 * SECOND);
    assert!(after.share("edge") >= 0.9, "after the thaw: {after:?}");
}

#[test]
fn with_the_edge_frozen_its_traffic_goes_to_the_next_nearest_not_to_farther_ones() {
    // As in `bench tiers`: the next tier just over the soft limit (22 ms), the last 40 ms
    // away. 200 requests a second keep four in flight on the 22 ms path, all crossing the
    // network: no reason to send any to the 40 ms one (counting them as load sent it a fifth).
    let start = Instant::now();
    let mut edge = Behaviour::new(1, 0);
    edge.frozen.push((start + 5 * SECOND, start + 35 * SECOND));
    let mut sim = Sim::new(&[]);
    sim.start = start;
    sim.now = start;
    sim.world = [
        ("edge", edge),
        ("metro", Behaviour::new(22, 0)),
        ("cloud", Behaviour::new(40, 0)),
    ]
    .into_iter()
    .collect();
    sim.load(Duration::ZERO, 40 * SECOND, 200, true);
    sim.run_until(42 * SECOND);
    let during = sim.stats(6 * SECOND, 35 * SECOND);
    assert!(during.failed.is_empty(), "{:?}", during.failed);
    assert!(during.share("cloud") < 0.01, "{during:?}");
}

#[test]
fn jitter_on_the_next_nearest_path_sends_nothing_to_a_farther_one() {
    // `bench tiers` with the edge frozen, as its ingress saw the paths (median RTTs 22.1
    // and 41.5 ms): jitter of up to a millisecond each way on the near one, two on the far
    // one, and a millisecond at the sidecar and service. A request that has been under way
    // a little longer than the near path's estimate is still crossing the network or being
    // served, not queued; counting it as load made the near instance look dearer than the
    // far one and sent 0.4 % of the requests there, which set the run's p99.9.
    let mut sim = Sim::new(&[]);
    sim.world = [
        ("metro", Behaviour::new(21, 1).with_jitter(1)),
        ("cloud", Behaviour::new(39, 1).with_jitter(2)),
    ]
    .into_iter()
    .collect();
    // 200 requests a second, not evenly spaced (3 ms and 7 ms apart), as an open loop's are
    // not: evenly spaced ones always find the oldest request under way 20 ms old.
    sim.load(Duration::ZERO, 30 * SECOND, 100, true);
    sim.load(3 * MS, 30 * SECOND, 100, true);
    sim.run_until(32 * SECOND);
    let stats = sim.stats(2 * SECOND, 30 * SECOND);
    assert!(stats.failed.is_empty(), "{:?}", stats.failed);
    assert!(stats.share("cloud") < 0.0005, "{stats:?}");
}

#[test]
fn one_of_two_instances_frozen_fails_nothing_and_delays_nothing_past_the_hard_limit() {
    let start = Instant::now();
    let mut sim = Sim::new(&[]);
    let mut a = Behaviour::new(1, 2);
    a.frozen.push((start + 2 * SECOND, start + 7 * SECOND));
    sim.world = [("a", a), ("b", Behaviour::new(2, 2))]
        .into_iter()
        .collect();
    sim.load(Duration::ZERO, 10 * SECOND, 50, true);
    sim.run_until(12 * SECOND);
    let stats = sim.stats(Duration::ZERO, 10 * SECOND);
    assert!(stats.failed.is_empty(), "{:?}", stats.failed);
    assert!(stats.slowest <= DEFAULT_LIMITS.hard_rtt, "{stats:?}");
}

#[test]
fn a_dead_service_behind_a_live_sidecar_fails_no_idempotent_request_and_attracts_nothing() {
    let mut world = vec![("a", Behaviour::new(1, 2)), ("b", Behaviour::new(1, 2))];
    let mut sim = Sim::new(&[]);
    world[0].1.service_dead_from = Some(sim.start + 2 * SECOND);
    sim.world = world.into_iter().collect();
    sim.load(Duration::ZERO, 8 * SECOND, 50, true);
    sim.run_until(10 * SECOND);
    let stats = sim.stats(Duration::ZERO, 8 * SECOND);
    assert!(stats.failed.is_empty(), "{:?}", stats.failed);
    let after = sim.stats(3 * SECOND, 8 * SECOND);
    assert_eq!(after.share("b"), 1.0, "{after:?}");
}

#[test]
fn a_slow_service_on_a_near_instance_is_not_taken_for_a_far_one() {
    let mut sim = Sim::new(&[("near", Behaviour::new(1, 150))]);
    sim.allocatable.push(("spare", Behaviour::new(1, 150)));
    sim.load(Duration::ZERO, 120 * SECOND, 50, true);
    sim.run_until(121 * SECOND);
    let stats = sim.stats(Duration::ZERO, 120 * SECOND);
    assert!(
        stats.failed.is_empty(),
        "{:?}",
        &stats.failed[..stats.failed.len().min(5)]
    );
    assert!(
        sim.allocations.is_empty(),
        "asked for {:?}",
        sim.allocations
    );
    assert_eq!(stats.share("near"), 1.0);
    let report = sim.core.report(sim.now);
    let service_time = report[0].service_time.expect("service times are measured");
    assert!(
        service_time[0] >= 140 * MS && service_time[0] <= 160 * MS,
        "{service_time:?}"
    );
    let network = report[0].view.quantiles.expect("network RTTs are measured");
    assert!(network[2] < 5 * MS, "{network:?}");
}

#[test]
fn a_culled_instance_is_forgotten_and_the_first_request_after_a_quiet_spell_does_not_wait_for_it() {
    let mut sim = Sim::new(&[("old", Behaviour::new(1, 1))]);
    sim.allocatable.push(("fresh", Behaviour::new(1, 1)));
    sim.load(Duration::ZERO, 5 * SECOND, 20, true);
    // Culled at 40 s (idle), its provider record expires at 160 s (the worst case: a withdrawal
    // that reached no DHT node, or a killed proxy); a request comes at 170 s.
    let culled = sim.t(40 * SECOND);
    let old = sim.world.get_mut("old").unwrap();
    old.gone_from = Some(culled);
    old.unlisted_from = Some(sim.start + 160 * SECOND);
    sim.load(170 * SECOND, MS, 1000, true);
    sim.run_until(200 * SECOND);
    let stats = sim.stats(170 * SECOND, 171 * SECOND);
    assert!(stats.failed.is_empty(), "{:?}", stats.failed);
    assert_eq!(stats.served.get("fresh"), Some(&1), "{stats:?}");
    assert!(stats.slowest < START_TIME + 100 * MS, "{stats:?}");
    assert_eq!(sim.core.known().copied().collect::<Vec<_>>(), vec!["fresh"]);
}

#[test]
fn a_culled_instance_that_said_goodbye_costs_nothing_but_the_cold_start() {
    let mut sim = Sim::new(&[("old", Behaviour::new(1, 1))]);
    sim.allocatable.push(("fresh", Behaviour::new(1, 1)));
    sim.load(Duration::ZERO, 5 * SECOND, 20, true);
    // Culled at 8 s: its proxy closes its connections as it stops; its provider record stays
    // (the worst case: its withdrawal reached no DHT node).
    let culled = sim.t(8 * SECOND);
    sim.world.get_mut("old").unwrap().gone_from = Some(culled);
    sim.at(culled, Event::Closed("old"));
    sim.load(8 * SECOND + 10 * MS, MS, 1000, true);
    sim.run_until(20 * SECOND);
    let stats = sim.stats(8 * SECOND, 9 * SECOND);
    assert!(stats.failed.is_empty(), "{:?}", stats.failed);
    assert_eq!(stats.served.get("fresh"), Some(&1), "{stats:?}");
    // The allocation, the new instance's discovery and its probe: nothing waits for "old".
    assert!(stats.slowest < START_TIME + 10 * MS, "{stats:?}");
}

#[test]
fn an_instance_culled_right_after_it_was_started_is_replaced_at_once() {
    let mut sim = Sim::new(&[]);
    sim.allocatable.push(("first", Behaviour::new(1, 1)));
    sim.allocatable.push(("second", Behaviour::new(1, 1)));
    sim.load(Duration::ZERO, MS, 1000, true);
    sim.run_until(SECOND);
    // Culled (it said goodbye) a second after it started, well within the cool-down that
    // follows a failed allocation.
    let culled = sim.t(SECOND);
    sim.world.get_mut("first").unwrap().gone_from = Some(culled);
    sim.at(culled, Event::Closed("first"));
    sim.load(SECOND + 10 * MS, MS, 1000, true);
    sim.run_until(5 * SECOND);
    let stats = sim.stats(SECOND, 2 * SECOND);
    assert!(stats.failed.is_empty(), "{:?}", stats.failed);
    assert_eq!(stats.served.get("second"), Some(&1), "{stats:?}");
    assert!(stats.slowest < START_TIME + 10 * MS, "{stats:?}");
}

#[test]
fn an_instance_started_by_someone_else_is_known_within_two_seconds_and_takes_the_traffic() {
    // A far instance serves; a near one appears on the overlay at 20.5 s (another ingress's
    // allocation, say). Issue 18: an ingress sees a new instance within 2 s.
    let mut near = Behaviour::new(1, 1);
    let listed = Duration::from_millis(20_500);
    let mut sim = Sim::new(&[("far", Behaviour::new(20, 1))]);
    near.listed_from = Some(sim.t(listed));
    sim.world.insert("near", near);
    sim.load(Duration::ZERO, 30 * SECOND, 200, true);
    sim.run_until(listed + 2 * SECOND);
    assert_eq!(sim.core.known().count(), 2, "the new instance is known");
    sim.run_until(30 * SECOND);
    let stats = sim.stats(listed + 3 * SECOND, 30 * SECOND);
    assert!(stats.failed.is_empty(), "{:?}", stats.failed);
    assert!(
        stats.served.get("near") > stats.served.get("far"),
        "the nearer instance takes the traffic: {stats:?}"
    );
}

#[test]
fn a_culled_instance_leaves_within_a_provider_lifetime_even_while_the_service_is_quiet() {
    let mut sim = Sim::new(&[("old", Behaviour::new(1, 1))]);
    sim.load(Duration::ZERO, 5 * SECOND, 20, true);
    let culled = sim.t(40 * SECOND);
    let old = sim.world.get_mut("old").unwrap();
    old.gone_from = Some(culled);
    // Its provider record lives two minutes after its last renewal (not withdrawn: the worst
    // case).
    old.unlisted_from = Some(culled + 120 * SECOND);
    sim.at(culled, Event::Closed("old"));
    sim.run_until(150 * SECOND);
    assert_eq!(sim.core.known().count(), 1, "still listed: still known");
    sim.run_until(160 * SECOND + T.discover_interval + SECOND);
    assert_eq!(sim.core.known().count(), 0, "gone with its record");
    assert!(sim.core.report(sim.now).is_empty());
}

#[test]
fn a_culled_instance_still_listed_costs_a_probe_timeout_not_the_idle_timeout() {
    let mut sim = Sim::new(&[("old", Behaviour::new(1, 1))]);
    sim.allocatable.push(("fresh", Behaviour::new(1, 1)));
    sim.load(Duration::ZERO, 5 * SECOND, 20, true);
    sim.world.get_mut("old").unwrap().gone_from = Some(sim.t(40 * SECOND));
    sim.load(100 * SECOND, MS, 1000, true);
    sim.run_until(120 * SECOND);
    let stats = sim.stats(100 * SECOND, 101 * SECOND);
    assert!(stats.failed.is_empty(), "{:?}", stats.failed);
    assert_eq!(stats.served.get("fresh"), Some(&1), "{stats:?}");
    // Its probe's timeout and the check that finds its connection silent.
    assert!(
        stats.slowest < T.probe_timeout + MIN_SILENCE + START_TIME + 100 * MS,
        "{stats:?}"
    );
}

#[test]
fn requests_wait_for_one_allocation_and_past_max_waiting_are_refused() {
    let mut sim = Sim::new(&[]);
    sim.core = ServiceCore::new(ServiceSettings::default(), 5);
    sim.allocatable.push(("first", Behaviour::new(1, 1)));
    sim.allocatable.push(("second", Behaviour::new(1, 1)));
    // Eight requests within 80 ms, while the first instance starts.
    sim.load(Duration::ZERO, 80 * MS, 100, true);
    sim.run_until(5 * SECOND);
    let stats = sim.stats(Duration::ZERO, SECOND);
    assert_eq!(
        sim.allocations,
        vec!["first"],
        "one allocation for all of them"
    );
    assert_eq!(stats.served.get("first"), Some(&5), "{stats:?}");
    assert_eq!(stats.failed.len(), 3, "{stats:?}");
    assert!(
        stats
            .failed
            .iter()
            .all(|e| e.contains("5 requests already wait"))
    );
}

#[test]
fn a_failing_allocator_is_asked_once_per_cool_down_and_its_reason_reaches_the_requests() {
    let mut sim = Sim::new(&[]);
    sim.allocator_refuses = true;
    sim.load(Duration::ZERO, 3 * SECOND, 20, true);
    sim.run_until(4 * SECOND);
    let stats = sim.stats(Duration::ZERO, 3 * SECOND);
    assert_eq!(stats.failed.len(), 60);
    assert!(
        stats
            .failed
            .iter()
            .all(|e| e.contains("every allocator refused")),
        "{stats:?}"
    );
    // Asked at 0 s and once after its two-second cool-down.
    assert_eq!(sim.asked, 2);
}

/// Instances `a` and `b`, 1 ms away; `a` frozen from 1 s to 20 s after `start`.
fn a_frozen_beside_b(start: Instant) -> BTreeMap<Key, Behaviour> {
    let mut a = Behaviour::new(1, 1);
    a.frozen.push((start + SECOND, start + 20 * SECOND));
    [("a", a), ("b", Behaviour::new(1, 1))]
        .into_iter()
        .collect()
}

#[test]
fn hedges_stop_when_the_retry_budget_is_spent() {
    let start = Instant::now();
    let mut sim = Sim::new(&[]);
    sim.world = a_frozen_beside_b(start);
    // Spend the budget before the freeze.
    while sim.budget.withdraw() {}
    sim.load(Duration::ZERO, 3 * SECOND, 50, true);
    sim.run_until(5 * SECOND);
    let stats = sim.stats(Duration::ZERO, 3 * SECOND);
    // The budget earns a fifth of a retry per request: some requests on the frozen instance
    // are hedged, not all; the rest fail when it is declared dead, well before the idle timeout.
    let tries: u32 = sim.requests.iter().map(|r| r.tries).sum();
    assert!(tries <= 150 + 150 / 5 + 1, "{tries} tries for 150 requests");
    assert!(
        stats.slowest < dead_after(&ServiceSettings::default()) + T.probe_timeout,
        "{stats:?}"
    );
}

#[test]
fn a_nearer_instance_is_asked_of_allocators_within_the_soft_limit_or_half_as_far() {
    for (rtt_ms, nearer_than_ms) in [(30, 20), (80, 40)] {
        let mut sim = Sim::new(&[("far", Behaviour::new(rtt_ms, 1))]);
        sim.load(Duration::ZERO, SECOND, 20, true);
        sim.run_until(2 * SECOND);
        // The instance's RTT as measured: a little over its nominal one.
        let wanted = nearer_than_ms * MS..(nearer_than_ms + 1) * MS;
        assert!(
            matches!(sim.reasons.first(), Some(Reason::Nearer(d)) if wanted.contains(d)),
            "an instance {rtt_ms} ms away: {:?}",
            sim.reasons
        );
    }
}

#[test]
fn a_frozen_instance_is_declared_dead_after_the_hard_limit_and_a_silent_check() {
    for hard_ms in [50, 100, 400] {
        let start = Instant::now();
        let mut sim = Sim::new(&[]);
        let limits = Limits {
            soft_rtt: 20 * MS,
            hard_rtt: hard_ms * MS,
        };
        sim.core
            .retune(ServiceSettings { limits, tuning: T }, start);
        sim.world = a_frozen_beside_b(start);
        // Not idempotent: the requests on the frozen instance wait until it is declared dead.
        sim.load(Duration::ZERO, 3 * SECOND, 50, false);
        sim.run_until(5 * SECOND);
        let failed_after: Vec<Duration> = sim
            .requests
            .iter()
            .filter_map(|r| match r.done {
                Some((done, Err(_))) => Some(done - r.arrived?),
                _ => None,
            })
            .collect();
        let longest = failed_after.iter().max().copied().unwrap_or_default();
        // Silent from the first overdue request on (its per-try timeout, the floor here) for
        // the hard limit, at least 100 ms, then silent while its connection is checked;
        // declared at the first tick past it.
        let dead = T.try_floor + (hard_ms * MS).max(T.dead_floor) + MIN_SILENCE;
        assert!(
            longest >= dead && longest <= dead + 20 * MS,
            "hard limit {hard_ms} ms, dead after {dead:?}: requests failed after {failed_after:?}"
        );
    }
}

#[test]
fn a_stalled_sidecar_whose_transport_answers_keeps_its_connection_and_what_is_on_it() {
    // As a sidecar on a loaded machine: for 800 ms it answers nothing, but its QUIC stack
    // acknowledges. Requests already on it (not idempotent: never sent twice) wait for it
    // rather than fail; new ones go to `b` meanwhile.
    let start = Instant::now();
    let mut a = Behaviour::new(1, 1);
    a.stalled.push((start + SECOND, start + SECOND + 800 * MS));
    let mut sim = Sim::new(&[("a", a), ("b", Behaviour::new(1, 1))]);
    sim.load(Duration::ZERO, 3 * SECOND, 50, false);
    sim.run_until(5 * SECOND);
    let stats = sim.stats(Duration::ZERO, 3 * SECOND);
    assert_eq!(stats.failed, Vec::<String>::new());
    assert!(
        stats.slowest >= 700 * MS,
        "nothing waited on the stall: {stats:?}"
    );
    let after = sim.stats(2 * SECOND, 3 * SECOND);
    assert!(after.share("a") > 0.2, "{after:?}");
}

#[test]
fn a_new_instance_slow_to_answer_its_first_probe_is_waited_for_while_its_transport_answers() {
    // The only instance, on a machine so loaded that its sidecar answers its first probe after
    // 800 ms (longer than a probe may take) while its QUIC stack acknowledges. No allocator
    // can start another: requests wait for it rather than fail for want of an instance (the
    // ingress gave up on it when its first probe timed out, and refused them; under load in
    // the test suite, it asked an allocator for an instance it did not need).
    let start = Instant::now();
    let mut slow = Behaviour::new(1, 1);
    slow.stalled.push((start, start + 800 * MS));
    let mut sim = Sim::new(&[("slow", slow)]);
    sim.allocator_refuses = true;
    sim.load(Duration::ZERO, 2 * SECOND, 50, true);
    sim.run_until(20 * SECOND);
    let stats = sim.stats(Duration::ZERO, 2 * SECOND);
    assert_eq!(stats.failed, Vec::<String>::new());
    assert_eq!(sim.asked, 0, "allocations asked for: {:?}", sim.reasons);
    assert!(stats.slowest < SECOND, "{stats:?}");
}

#[test]
fn a_new_instance_is_waited_for_while_its_connection_is_being_set_up() {
    // The only instance is 60 ms away: its connection takes two round trips to set up, longer
    // than the hard limit (100 ms), after which a silent instance has its connection checked.
    // There is none yet: that is no reason to stop waiting for it (the ingress did, and asked
    // for an instance for want of any beside the nearer one it wanted).
    let mut sim = Sim::new(&[("far", Behaviour::new(60, 1))]);
    sim.allocatable.push(("near", Behaviour::new(1, 1)));
    sim.load(Duration::ZERO, MS, 1000, true);
    sim.run_until(10 * SECOND);
    let stats = sim.stats(Duration::ZERO, SECOND);
    assert!(stats.failed.is_empty(), "{:?}", stats.failed);
    assert_eq!(stats.served.get("far"), Some(&1), "{stats:?}");
    assert!(
        sim.reasons.iter().all(|r| matches!(r, Reason::Nearer(_))),
        "{:?}",
        sim.reasons
    );
}

/// One request to a service whose only instance behaves as `behaviour`, an allocator able to
/// start a healthy one: served by the new instance, not failed; how long it took.
fn one_request_to(behaviour: Behaviour) -> Duration {
    let mut sim = Sim::new(&[("listed", behaviour)]);
    sim.allocatable.push(("fresh", Behaviour::new(1, 1)));
    sim.load(Duration::ZERO, MS, 1000, true);
    sim.run_until(10 * SECOND);
    let stats = sim.stats(Duration::ZERO, SECOND);
    assert!(stats.failed.is_empty(), "{:?}", stats.failed);
    assert_eq!(stats.served.get("fresh"), Some(&1), "{stats:?}");
    stats.slowest
}

#[test]
fn a_new_instance_that_cannot_be_reached_is_not_waited_for() {
    // Listed, but nothing answers at its address and no connection opens (gone before it was
    // ever reached): the first probe's timeout is all it costs before an allocation starts.
    let mut gone = Behaviour::new(1, 1);
    gone.gone_from = Some(Instant::now());
    let slowest = one_request_to(gone);
    assert!(
        slowest < T.probe_timeout + MIN_SILENCE + START_TIME + 100 * MS,
        "{slowest:?}"
    );
}

#[test]
fn a_new_instance_whose_transport_answers_but_never_its_sidecar_is_waited_for_a_while_only() {
    // Its QUIC stack acknowledges, its sidecar never answers: requests wait for it at most
    // T.verify_patience, then an allocation starts.
    let start = Instant::now();
    let mut stuck = Behaviour::new(1, 1);
    stuck.stalled.push((start, start + 3600 * SECOND));
    let slowest = one_request_to(stuck);
    assert!(
        slowest < T.verify_patience + START_TIME + 100 * MS,
        "{slowest:?}"
    );
}

#[test]
fn a_non_idempotent_request_on_a_frozen_instance_is_not_sent_twice() {
    let start = Instant::now();
    let mut sim = Sim::new(&[]);
    sim.world = a_frozen_beside_b(start);
    sim.load(Duration::ZERO, 3 * SECOND, 50, false);
    sim.run_until(5 * SECOND);
    assert!(sim.requests.iter().all(|r| r.tries <= 1));
    let stats = sim.stats(Duration::ZERO, 3 * SECOND);
    // Only those already on the frozen instance fail, when it is declared dead.
    assert!(stats.failed.len() <= 3, "{:?}", stats.failed);
}

#[test]
fn an_instance_whose_answers_take_longer_than_the_probe_interval_is_not_probed_while_busy() {
    // 400 ms of service time, 3 requests a second: an answer every 333 ms, more than the
    // probe interval, and a request always under way.
    let mut sim = Sim::new(&[("slow", Behaviour::new(1, 400))]);
    sim.load(Duration::ZERO, 20 * SECOND, 3, true);
    sim.run_until(5 * SECOND);
    let early = sim.probes;
    sim.run_until(20 * SECOND);
    assert_eq!(sim.probes, early, "probes while requests measured it");
}

#[test]
fn an_idle_instance_is_probed_less_and_less_and_a_busy_one_not_at_all() {
    let mut sim = Sim::new(&[
        ("near", Behaviour::new(1, 1)),
        ("far", Behaviour::new(40, 1)),
    ]);
    sim.load(Duration::ZERO, 60 * SECOND, 100, true);
    sim.run_until(10 * SECOND);
    let early = sim.probes;
    sim.run_until(60 * SECOND);
    let late = sim.probes - early;
    // Before: every instance every 200 ms, 250 probes in 50 s each. Now "near" answers
    // traffic, "far" backs off to one probe per T.probe_idle_max.
    assert!(
        late <= 50 / T.probe_idle_max.as_secs() as usize + 2,
        "{late} probes in 50 s"
    );
}
