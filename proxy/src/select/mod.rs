//! Choosing the instance a request goes to. Pure: no I/O, the caller passes the time and the
//! randomness, so every rule is unit-tested and benchmarked on its own.
//!
//! Per instance the chooser keeps a sliding-window HDR histogram of RTT samples (QUIC path RTT
//! and request round trips), a peak-sensitive EWMA, the requests in flight and its failure
//! state. For each request:
//!
//! 1. instances ejected for failing, and instances whose RTT is over the hard limit, are out;
//!    an instance not measured yet is only used when nothing measured is left (the caller
//!    probes new instances, so they are measured before they get full traffic);
//! 2. instances within the soft limit are preferred; if none is, the rest are used and the
//!    decision says a nearer instance is wanted (the proxy asks an allocator);
//! 3. among the candidates, power of two choices: two at random, the lower cost wins, cost =
//!    RTT estimate x (requests in flight + 1). The RTT estimate is a high quantile of the
//!    window ([`Policy::RttHistogram`]) or the peak EWMA ([`Policy::PeakEwma`]);
//!    [`Policy::RoundRobin`] ignores RTT altogether, as a baseline.
//!
//! An instance failing [`EJECT_AFTER`] times in a row is ejected for a period that doubles with
//! each ejection (up to [`MAX_EJECTION`]); a success resets it.

use std::time::{Duration, Instant};

use control::rtt::{RttWindow, WindowShape};

use crate::config::perf::{Limits, Policy};

/// Consecutive failures that eject an instance.
pub const EJECT_AFTER: u32 = 3;
/// First ejection period; each further one doubles.
pub const FIRST_EJECTION: Duration = Duration::from_secs(1);
pub const MAX_EJECTION: Duration = Duration::from_secs(60);
/// Quantile of the RTT window the `rtt-histogram` policy routes on.
pub const ROUTING_QUANTILE: f64 = 0.9;
/// How long a computed quantile is reused: summarising a window costs microseconds, too much
/// for every request, and RTTs do not move faster than this matters.
const QUANTILE_REFRESH: Duration = Duration::from_millis(100);
/// Time constant of the peak EWMA (linkerd and Finagle use 10 s).
const EWMA_DECAY: Duration = Duration::from_secs(10);

/// What the chooser knows of one instance.
#[derive(Debug, Clone)]
struct Instance<K> {
    key: K,
    window: RttWindow,
    /// The routing quantile and when it was computed.
    quantile: Option<(Instant, Duration)>,
    /// Peak EWMA in seconds and the time of its last update.
    peak_ewma: Option<(Instant, f64)>,
    in_flight: u32,
    failures_in_a_row: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
}

impl<K> Instance<K> {
    fn new(key: K, now: Instant) -> Self {
        Self {
            key,
            window: RttWindow::new(
                WindowShape {
                    slices: 4,
                    slice: Duration::from_secs(5),
                },
                now,
            ),
            quantile: None,
            peak_ewma: None,
            in_flight: 0,
            failures_in_a_row: 0,
            ejections: 0,
            ejected_until: None,
        }
    }

    fn record(&mut self, rtt: Duration, now: Instant) {
        self.window.record(now, rtt);
        let sample = rtt.as_secs_f64();
        self.peak_ewma = Some(match self.peak_ewma {
            // A slower sample is taken at once (peak); faster ones pull the average down slowly.
            Some((_, value)) if sample > value => (now, sample),
            Some((at, value)) => {
                let weight = (-now.saturating_duration_since(at).as_secs_f64()
                    / EWMA_DECAY.as_secs_f64())
                .exp();
                (now, value * weight + sample * (1.0 - weight))
            }
            None => (now, sample),
        });
        // A new sample may move the quantile: recompute on next use if it is getting old.
        if let Some((at, _)) = self.quantile
            && now.saturating_duration_since(at) >= QUANTILE_REFRESH
        {
            self.quantile = None;
        }
    }

    /// The RTT estimate `policy` routes on, or `None` before the first sample.
    fn estimate(&mut self, policy: Policy, now: Instant) -> Option<Duration> {
        match policy {
            Policy::PeakEwma => self
                .peak_ewma
                .map(|(_, secs)| Duration::from_secs_f64(secs)),
            Policy::RttHistogram | Policy::RoundRobin => {
                if let Some((at, value)) = self.quantile
                    && now.saturating_duration_since(at) < QUANTILE_REFRESH
                {
                    return Some(value);
                }
                let value = self.window.quantile(now, ROUTING_QUANTILE)?;
                self.quantile = Some((now, value));
                Some(value)
            }
        }
    }

    fn ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|until| now < until)
    }
}

/// The outcome of one choice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision<K> {
    /// Where the request goes; `None` when no instance is usable.
    pub pick: Option<K>,
    /// No usable instance is within the soft limit (or there is none at all): ask an allocator
    /// for a nearer one.
    pub want_nearer: bool,
}

/// The instances of one service and the state to choose among them.
#[derive(Debug, Clone)]
pub struct Chooser<K> {
    policy: Policy,
    instances: Vec<Instance<K>>,
    next_in_turn: usize,
    /// Scratch space of [`Chooser::choose`]: (index, RTT estimate) per class of instance.
    classes: [Vec<(usize, Duration)>; 3],
}

impl<K: Clone + PartialEq> Chooser<K> {
    pub fn new(policy: Policy) -> Self {
        Self {
            policy,
            instances: Vec::new(),
            next_in_turn: 0,
            classes: Default::default(),
        }
    }

    fn find(&mut self, key: &K) -> Option<&mut Instance<K>> {
        self.instances.iter_mut().find(|i| &i.key == key)
    }

    /// Adds an instance (not yet measured); an existing one is left as it is.
    pub fn add(&mut self, key: K, now: Instant) {
        if self.find(&key).is_none() {
            self.instances.push(Instance::new(key, now));
        }
    }

    pub fn remove(&mut self, key: &K) {
        self.instances.retain(|i| &i.key != key);
    }

    pub fn len(&self) -> usize {
        self.instances.len()
    }

    pub fn is_empty(&self) -> bool {
        self.instances.is_empty()
    }

    /// An RTT sample of `key` (path RTT or a request's round trip).
    pub fn record_rtt(&mut self, key: &K, rtt: Duration, now: Instant) {
        if let Some(instance) = self.find(key) {
            instance.record(rtt, now);
        }
    }

    /// A request to `key` starts.
    pub fn start(&mut self, key: &K) {
        if let Some(instance) = self.find(key) {
            instance.in_flight += 1;
        }
    }

    /// A request to `key` ended; a failure counts towards ejection.
    pub fn finish(&mut self, key: &K, success: bool, now: Instant) {
        let Some(instance) = self.find(key) else {
            return;
        };
        instance.in_flight = instance.in_flight.saturating_sub(1);
        if success {
            instance.failures_in_a_row = 0;
            instance.ejections = 0;
            return;
        }
        instance.failures_in_a_row += 1;
        if instance.failures_in_a_row >= EJECT_AFTER {
            let period = FIRST_EJECTION
                .saturating_mul(1 << instance.ejections.min(16))
                .min(MAX_EJECTION);
            instance.ejected_until = Some(now + period);
            instance.ejections += 1;
            instance.failures_in_a_row = 0;
        }
    }

    /// Chooses where the next request goes. `random(n)` must return a number below `n`.
    pub fn choose(
        &mut self,
        now: Instant,
        limits: Limits,
        mut random: impl FnMut(usize) -> usize,
    ) -> Decision<K> {
        let policy = self.policy;
        if policy == Policy::RoundRobin {
            return self.in_turn(now);
        }
        // Usable instances by class: within soft, within hard, not measured yet. The buffers
        // live in the chooser so that choosing allocates nothing.
        let Self {
            instances, classes, ..
        } = self;
        classes.iter_mut().for_each(Vec::clear);
        for (index, instance) in instances.iter_mut().enumerate() {
            if instance.ejected(now) {
                continue;
            }
            match instance.estimate(policy, now) {
                Some(rtt) if rtt <= limits.soft_rtt => classes[0].push((index, rtt)),
                Some(rtt) if rtt <= limits.hard_rtt => classes[1].push((index, rtt)),
                Some(_) => {}
                None => classes[2].push((index, Duration::ZERO)),
            }
        }
        let want_nearer = classes[0].is_empty();
        let candidates = classes.iter().find(|c| !c.is_empty());
        let pick = candidates.map(|candidates| {
            let index = match candidates.len() {
                1 => candidates[0].0,
                n => {
                    // Power of two choices: two distinct candidates, the cheaper one wins.
                    let a = random(n);
                    let b = (a + 1 + random(n - 1)) % n;
                    let cost = |(index, rtt): (usize, Duration)| {
                        rtt.as_secs_f64() * f64::from(instances[index].in_flight + 1)
                    };
                    if cost(candidates[a]) <= cost(candidates[b]) {
                        candidates[a].0
                    } else {
                        candidates[b].0
                    }
                }
            };
            instances[index].key.clone()
        });
        Decision { pick, want_nearer }
    }

    /// Round robin over the instances not ejected, RTT ignored.
    fn in_turn(&mut self, now: Instant) -> Decision<K> {
        let n = self.instances.len();
        let pick = (0..n)
            .map(|step| (self.next_in_turn + step) % n)
            .find(|&i| !self.instances[i].ejected(now));
        if let Some(index) = pick {
            self.next_in_turn = (index + 1) % n;
        }
        Decision {
            pick: pick.map(|i| self.instances[i].key.clone()),
            want_nearer: pick.is_none(),
        }
    }
}

#[cfg(test)]
mod tests;
