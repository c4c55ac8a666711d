//! Whether the sidecar's service answers: a pure state machine ([`HealthMachine`]) fed with
//! the outcomes of liveness checks and of real requests, with the time as an argument, behind
//! a shared handle ([`ServiceHealth`]) that the request path reads as one atomic, and one task
//! ([`run_checks`]) doing the checks' I/O.
//!
//! # Rules
//! 1. **Starting until it first answers.** A service that has never answered (a liveness
//!    check connected, or a request got a response) is starting: probes hear it is down, and
//!    the instance is not advertised. Failures while starting keep it starting.
//! 2. **Serving after one answer.** One connected check or one response makes it serving.
//! 3. **Down at the first refusal.** A check whose connect fails at once (refused: definitive
//!    on loopback, where services run beside their sidecar), or a request that could not
//!    connect to the service, makes a serving service down.
//! 4. **Down after timeouts in a row.** A check whose connect does not complete within
//!    [`HealthPolicy::connect_timeout`] makes it down only after
//!    [`HealthPolicy::timeouts_down`] of them in a row (a busy service's backlog may be slow).
//! 5. **Checks every interval.** While serving, a check starts every
//!    [`HealthPolicy::interval`] from the start of the last one; one that takes longer is
//!    followed by the next at once. While starting or down, checks come sooner: the first
//!    [`HealthPolicy::first_retry`] after the last, then twice as long each time up to the
//!    interval, so that a service that starts (or comes back) is seen serving, and its
//!    instance advertised, within milliseconds of listening.
//!
//! A request that failed for any other reason (the service reset it mid-exchange, the
//! ingress's request body broke) says nothing about whether the service answers and changes
//! nothing. A successful TCP connect is all a check asks: a service that accepts but does not
//! answer (frozen, overloaded) is the ingress's per-try timeouts' business.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicU8, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::watch;

use crate::framing::Health;

/// What the sidecar knows of its service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceState {
    /// It has not answered yet.
    Starting = 0,
    /// It answers.
    Serving = 1,
    /// It answered before and now does not.
    Down = 2,
}

impl ServiceState {
    /// What a probe's answer says: anything but serving is down.
    pub fn health(self) -> Health {
        match self {
            Self::Serving => Health::Serving,
            Self::Starting | Self::Down => Health::Down,
        }
    }

    fn from_u8(value: u8) -> Self {
        match value {
            1 => Self::Serving,
            2 => Self::Down,
            _ => Self::Starting,
        }
    }
}

/// How often and how patiently the service is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthPolicy {
    /// From the start of one liveness check to the start of the next, while serving.
    pub interval: Duration,
    /// While starting or down: from one check to the next at first (doubling each time, up
    /// to `interval`).
    pub first_retry: Duration,
    /// A connect (of a check, or of a request to the service) not done within this failed.
    pub connect_timeout: Duration,
    /// Timed-out checks in a row that make a serving service down.
    pub timeouts_down: u32,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(500),
            first_retry: Duration::from_millis(5),
            connect_timeout: Duration::from_secs(1),
            timeouts_down: 2,
        }
    }
}

/// Something that tells whether the service answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observation {
    /// A liveness check connected.
    Connected,
    /// A liveness check's connect failed at once (refused, unreachable).
    Refused,
    /// A liveness check's connect did not complete within the connect timeout.
    TimedOut,
    /// A request got a response from the service, whatever its status.
    Answered,
    /// A request could not connect to the service: nothing reached it.
    ConnectFailed,
}

/// A change of state: what it was, what it is, and how long the old state lasted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// The state left.
    pub from: ServiceState,
    /// The state entered.
    pub to: ServiceState,
    /// How long the service was in `from`.
    pub lasted: Duration,
}

/// The rules of the module, without I/O or clock.
#[derive(Debug, Clone)]
pub struct HealthMachine {
    policy: HealthPolicy,
    state: ServiceState,
    /// When `state` began.
    since: Instant,
    timeouts_in_a_row: u32,
    next_check: Instant,
    /// The wait after the next check while not serving.
    retry: Duration,
}

impl HealthMachine {
    /// A service starting at `now`; the first check is due at once.
    pub fn new(policy: HealthPolicy, now: Instant) -> Self {
        Self {
            policy,
            state: ServiceState::Starting,
            since: now,
            timeouts_in_a_row: 0,
            next_check: now,
            retry: policy.first_retry,
        }
    }

    /// The current state.
    pub fn state(&self) -> ServiceState {
        self.state
    }

    /// When the current state began.
    pub fn since(&self) -> Instant {
        self.since
    }

    /// When the next liveness check is due.
    pub fn next_check(&self) -> Instant {
        self.next_check
    }

    /// Whether a check is due at `now`; if so it counts as started, and the next one is
    /// scheduled an interval after it (rule 5).
    pub fn start_check(&mut self, now: Instant) -> bool {
        if now < self.next_check {
            return false;
        }
        let wait = match self.state {
            ServiceState::Serving => self.policy.interval,
            ServiceState::Starting | ServiceState::Down => {
                let wait = self.retry;
                self.retry = (self.retry * 2).min(self.policy.interval);
                wait
            }
        };
        self.next_check = now + wait;
        true
    }

    /// Applies `observation` made at `now`; returns the change of state it caused.
    pub fn observe(&mut self, observation: Observation, now: Instant) -> Option<Transition> {
        let next = match observation {
            Observation::Connected | Observation::Answered => {
                self.timeouts_in_a_row = 0;
                ServiceState::Serving
            }
            Observation::Refused | Observation::ConnectFailed => {
                self.timeouts_in_a_row = 0;
                self.failed()
            }
            Observation::TimedOut => {
                self.timeouts_in_a_row = self.timeouts_in_a_row.saturating_add(1);
                if self.timeouts_in_a_row >= self.policy.timeouts_down {
                    self.failed()
                } else {
                    self.state
                }
            }
        };
        if next == self.state {
            return None;
        }
        let transition = Transition {
            from: self.state,
            to: next,
            lasted: now.saturating_duration_since(self.since),
        };
        self.state = next;
        self.since = now;
        if next != ServiceState::Serving {
            // Rule 5: look again soon.
            self.retry = self.policy.first_retry;
            self.next_check = self.next_check.min(now + self.retry);
        }
        Some(transition)
    }

    /// The state after a failure: down, unless the service never answered (rule 1).
    fn failed(&self) -> ServiceState {
        match self.state {
            ServiceState::Starting => ServiceState::Starting,
            ServiceState::Serving | ServiceState::Down => ServiceState::Down,
        }
    }
}

/// The health of one sidecar's service, shared by its request path (which reads it as an
/// atomic and reports what requests saw), its checking task and whoever waits for it.
#[derive(Debug)]
pub struct ServiceHealth {
    upstream: SocketAddr,
    policy: HealthPolicy,
    /// The machine's state, as a [`ServiceState`] number.
    state: AtomicU8,
    machine: Mutex<HealthMachine>,
    changes: watch::Sender<ServiceState>,
    /// Told when a change of state brought the next check forward (rule 5), so that
    /// [`run_checks`], asleep until the check it knew of, looks again at once.
    rescheduled: tokio::sync::Notify,
}

impl ServiceHealth {
    /// The health of the service at `upstream`, starting. Nothing checks it until
    /// [`run_checks`] runs.
    pub fn new(upstream: SocketAddr, policy: HealthPolicy) -> Arc<Self> {
        Arc::new(Self {
            upstream,
            policy,
            state: AtomicU8::new(ServiceState::Starting as u8),
            machine: Mutex::new(HealthMachine::new(policy, Instant::now())),
            changes: watch::Sender::new(ServiceState::Starting),
            rescheduled: tokio::sync::Notify::new(),
        })
    }

    /// The address of the service, which checks connect to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// How the service is checked.
    pub fn policy(&self) -> HealthPolicy {
        self.policy
    }

    /// The current state: one atomic load.
    pub fn state(&self) -> ServiceState {
        ServiceState::from_u8(self.state.load(Ordering::Relaxed))
    }

    /// What a probe's answer says now.
    pub fn health(&self) -> Health {
        self.state().health()
    }

    /// Reports what a check or a request saw. A response from a service known to serve (the
    /// common case) costs one atomic load.
    pub fn observe(&self, observation: Observation) {
        if observation == Observation::Answered && self.state() == ServiceState::Serving {
            return;
        }
        let transition = {
            let mut machine = self.machine.lock().unwrap_or_else(|e| e.into_inner());
            let transition = machine.observe(observation, Instant::now());
            if let Some(transition) = transition {
                self.state.store(transition.to as u8, Ordering::Relaxed);
                self.changes.send_replace(transition.to);
            }
            transition
        };
        if let Some(Transition { from, to, lasted }) = transition {
            if to != ServiceState::Serving {
                self.rescheduled.notify_one();
            }
            let upstream = self.upstream;
            match to {
                ServiceState::Serving => {
                    tracing::info!(%upstream, ?from, after = ?lasted, ?observation, "the service answers")
                }
                _ => {
                    tracing::warn!(%upstream, serving_for = ?lasted, ?observation, "the service does not answer")
                }
            }
        }
    }

    /// Resolves once the service is serving (at once if it is).
    pub async fn serving(&self) {
        let mut changes = self.changes.subscribe();
        // The sender lives in `self`, so the channel cannot close while this waits.
        let _ = changes
            .wait_for(|state| *state == ServiceState::Serving)
            .await;
    }

    /// Every change of state, starting with the current one.
    pub fn subscribe(&self) -> watch::Receiver<ServiceState> {
        self.changes.subscribe()
    }

    /// When the next check is due, and whether it is due at `now` (then it counts as started).
    fn start_check(&self, now: Instant) -> Result<(), Instant> {
        let mut machine = self.machine.lock().unwrap_or_else(|e| e.into_inner());
        if machine.start_check(now) {
            Ok(())
        } else {
            Err(machine.next_check())
        }
    }
}

/// Checks the service of `health` by a TCP connect whenever one is due, until `health` is
/// dropped by everyone else (then within one interval).
pub async fn run_checks(health: Weak<ServiceHealth>) {
    loop {
        let (upstream, timeout) = {
            let Some(health) = health.upgrade() else {
                return;
            };
            match health.start_check(Instant::now()) {
                Ok(()) => (health.upstream, health.policy.connect_timeout),
                Err(due) => {
                    // Until it is due, or sooner if a request's failure brought it forward.
                    tokio::select! {
                        () = tokio::time::sleep_until(due.into()) => {}
                        () = health.rescheduled.notified() => {}
                    }
                    continue;
                }
            }
        };
        let observation = check(upstream, timeout).await;
        match health.upgrade() {
            Some(health) => health.observe(observation),
            None => return,
        }
    }
}

/// One liveness check: a TCP connect to `upstream`, closed at once.
pub async fn check(upstream: SocketAddr, timeout: Duration) -> Observation {
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(upstream)).await {
        Ok(Ok(_connected)) => Observation::Connected,
        Ok(Err(error)) => {
            tracing::debug!(%upstream, %error, "liveness check failed");
            Observation::Refused
        }
        Err(_) => Observation::TimedOut,
    }
}

#[cfg(test)]
mod tests;
