//! Choosing the instance a request goes to. Pure: no I/O, the caller passes the time and the
//! randomness, so every rule is unit-tested and benchmarked on its own.
//!
//! Per instance the chooser keeps a sliding-window HDR histogram of RTT samples (QUIC path RTT
//! and request round trips), a peak-sensitive EWMA, the requests in flight and its failure
//! state. For each request:
//!
//! 1. instances ejected for failing, instances held out by the caller ([`Chooser::hold`]: not
//!    verified yet, or their service is down), and instances whose RTT is over the hard limit,
//!    are out; an instance not measured yet is only used when nothing measured is left;
//! 2. instances within the soft limit are preferred; if none is, the rest are used and the
//!    decision says a nearer instance is wanted (the proxy asks an allocator);
//! 3. among the candidates, power of two choices: two at random, the lower cost wins (on a
//!    tie, the one with fewer requests in flight). [`Policy::PeakEwma`] is Finagle's and
//!    linkerd's: cost = peak EWMA of the RTT x (requests in flight + 1).
//!    [`Policy::RttHistogram`] routes on a high quantile of the window and counts as load
//!    only the requests in flight for longer than `load-after-rtts` times that RTT (past
//!    the network: at the service or queued for it): cost = RTT x (such requests + 1). A
//!    request still crossing the network is not load: 200 requests a second keep four in
//!    flight on a path 20 ms long however idle its instance, and counting them sent a fifth
//!    of the traffic to an idle instance 40 ms away; nor is one a little late (the path's
//!    jitter, a millisecond at the sidecar), which at one RTT sent 0.4 % of it there.
//!    [`Policy::RoundRobin`] ignores RTT altogether, as a baseline.
//!
//! The window is short (`rtt-window`, a second) so that a change of path is followed within about a
//! second; an instance whose window ran empty (no traffic, no probe answered yet) keeps its
//! last estimate rather than becoming "unmeasured" again.
//!
//! The RTT samples are network round trips (probes, the QUIC path RTT of requests), never a
//! service's time to answer.
//!
//! An exchange still unanswered (a probe, or a request past its per-try timeout) is a lower
//! bound on the RTT: an instance whose oldest unanswered exchange (timed out or not) is older
//! than its estimate is routed on that age instead. A stalled instance (a frozen process, a
//! dead link) so loses its traffic within a probe interval plus the RTT of the next instance,
//! and gets none until it answers again, where waiting for probes to time out and eject it
//! would take seconds, and ejections end.
//!
//! An instance failing `eject-after` times in a row is ejected for `first-ejection`, a period
//! that doubles with each ejection (up to `max-ejection`); a success (an answered probe) ends the ejection and
//! resets the count.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use mtc_overlay::rtt::{RttWindow, WindowShape};

use crate::config::perf::{Limits, Policy, Tuning};

/// How long a computed quantile is reused: summarising a window costs microseconds, too much
/// for every request, and RTTs do not move faster than this matters.
const QUANTILE_REFRESH: Duration = Duration::from_millis(50);
/// Slices of an RTT window (`rtt-window` long): samples leave it a quarter at a time.
const WINDOW_SLICES: u32 = 4;

/// The shape of a window `length` long.
pub fn window_shape(length: Duration) -> WindowShape {
    WindowShape {
        slices: WINDOW_SLICES as usize,
        slice: length / WINDOW_SLICES,
    }
}

/// What the chooser knows of one instance.
#[derive(Debug, Clone)]
struct Instance<K> {
    key: K,
    window: RttWindow,
    /// The routing quantile and when it was computed.
    quantile: Option<(Instant, Duration)>,
    /// Peak EWMA in seconds and the time of its last update.
    peak_ewma: Option<(Instant, f64)>,
    /// When the requests in flight started, oldest first (one entry each). Taken to end in
    /// about the order they started: an end removes the oldest (a request that overtakes an
    /// older one leaves a younger start behind, which only makes the load look lighter for a
    /// while).
    started: VecDeque<Instant>,
    /// When the oldest probe not answered since was sent.
    unanswered_since: Option<Instant>,
    failures_in_a_row: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
    /// Held out of the choice by the caller.
    held: bool,
}

impl<K> Instance<K> {
    fn new(key: K, tuning: &Tuning, now: Instant) -> Self {
        Self {
            key,
            window: RttWindow::new(window_shape(tuning.rtt_window), now),
            quantile: None,
            peak_ewma: None,
            started: VecDeque::new(),
            unanswered_since: None,
            failures_in_a_row: 0,
            ejections: 0,
            ejected_until: None,
            held: false,
        }
    }

    fn record(&mut self, rtt: Duration, tuning: &Tuning, now: Instant) {
        self.window.record(now, rtt);
        let sample = rtt.as_secs_f64();
        self.peak_ewma = Some(match self.peak_ewma {
            // A slower sample is taken at once (peak); faster ones pull the average down slowly.
            Some((_, value)) if sample > value => (now, sample),
            Some((at, value)) => {
                let weight = (-now.saturating_duration_since(at).as_secs_f64()
                    / tuning.ewma_decay.as_secs_f64())
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

    /// The RTT estimate `policy` routes on, or `None` before the first sample: the policy's
    /// estimate from samples, or the age of the outstanding probe if that is more.
    fn estimate(&mut self, tuning: &Tuning, now: Instant) -> Option<Duration> {
        let sampled = self.sampled_estimate(tuning, now)?;
        let waited = self
            .unanswered_since
            .map_or(Duration::ZERO, |sent| now.saturating_duration_since(sent));
        Some(sampled.max(waited))
    }

    fn sampled_estimate(&mut self, tuning: &Tuning, now: Instant) -> Option<Duration> {
        match tuning.policy {
            Policy::PeakEwma => self
                .peak_ewma
                .map(|(_, secs)| Duration::from_secs_f64(secs)),
            Policy::RttHistogram | Policy::RoundRobin => {
                if let Some((at, value)) = self.quantile
                    && now.saturating_duration_since(at) < QUANTILE_REFRESH
                {
                    return Some(value);
                }
                // An empty window keeps the last estimate (its time is not renewed, so the
                // next call looks at the window again), or else the EWMA of what was seen.
                let Some(value) = self.window.quantile(now, tuning.rtt_quantile) else {
                    return self.quantile.map(|(_, value)| value).or_else(|| {
                        self.peak_ewma
                            .map(|(_, secs)| Duration::from_secs_f64(secs))
                    });
                };
                self.quantile = Some((now, value));
                Some(value)
            }
        }
    }

    /// Requests in flight for longer than `load_after_rtts` times `rtt`: at the service or
    /// queued for it.
    fn past_the_network(&self, rtt: Duration, load_after_rtts: u32, now: Instant) -> u32 {
        let rtt = rtt * load_after_rtts;
        let old = self
            .started
            .iter()
            .take_while(|&&started| now.saturating_duration_since(started) > rtt)
            .count();
        u32::try_from(old).unwrap_or(u32::MAX)
    }

    fn in_flight(&self) -> u32 {
        u32::try_from(self.started.len()).unwrap_or(u32::MAX)
    }

    fn ended(&mut self) {
        self.started.pop_front();
    }

    fn ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|until| now < until)
    }

    /// Out of the choice altogether: ejected or held.
    fn out(&self, now: Instant) -> bool {
        self.held || self.ejected(now)
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
    /// The RTT estimate of the pick, when it has one: a nearer instance must beat it.
    pub pick_rtt: Option<Duration>,
}

/// What the chooser knows of one instance, for metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceView<K> {
    /// The instance, as given to [`Chooser::add`].
    pub key: K,
    /// p50, p90 and p99 of the window, if it holds samples.
    pub quantiles: Option<[Duration; 3]>,
    /// Requests started ([`Chooser::start`]) and not yet ended ([`Chooser::finish`] or
    /// [`Chooser::release`]).
    pub in_flight: u32,
    /// Whether it is ejected for failing at the time of the view.
    pub ejected: bool,
}

/// The instances of one service and the state to choose among them.
#[derive(Debug, Clone)]
pub struct Chooser<K> {
    tuning: Tuning,
    instances: Vec<Instance<K>>,
    next_in_turn: usize,
    /// Scratch space of [`Chooser::choose`]: (index, RTT estimate) per class of instance.
    classes: [Vec<(usize, Duration)>; 3],
}

impl<K: Clone + PartialEq> Chooser<K> {
    /// A chooser with no instances yet, choosing with `tuning`.
    pub fn new(tuning: Tuning) -> Self {
        Self {
            tuning,
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
            self.instances.push(Instance::new(key, &self.tuning, now));
        }
    }

    /// Forgets an instance and all that is known of it; an unknown `key` is ignored.
    pub fn remove(&mut self, key: &K) {
        self.instances.retain(|i| &i.key != key);
    }

    /// How many instances there are, usable or not.
    pub fn len(&self) -> usize {
        self.instances.len()
    }

    /// Whether there is no instance at all.
    pub fn is_empty(&self) -> bool {
        self.instances.is_empty()
    }

    /// Whether `key` is one of the instances (ejected or held ones included).
    pub fn contains(&self, key: &K) -> bool {
        self.instances.iter().any(|i| &i.key == key)
    }

    /// Every instance as it stands at `now`.
    pub fn view(&mut self, now: Instant) -> Vec<InstanceView<K>> {
        self.instances
            .iter_mut()
            .map(|i| InstanceView {
                key: i.key.clone(),
                quantiles: i.window.summary(now).map(|s| [s.p50, s.p90, s.p99]),
                in_flight: i.in_flight(),
                ejected: i.ejected(now),
            })
            .collect()
    }

    /// An RTT sample of `key` (path RTT or a request's round trip).
    pub fn record_rtt(&mut self, key: &K, rtt: Duration, now: Instant) {
        let tuning = self.tuning;
        if let Some(instance) = self.find(key) {
            instance.record(rtt, &tuning, now);
        }
    }

    /// The tuning in use.
    pub fn tuning(&self) -> &Tuning {
        &self.tuning
    }

    /// Chooses with `tuning` from now on (perf.conf was reloaded). What is known of each
    /// instance stays: its estimate, EWMA, requests in flight and ejection. A new
    /// `rtt-window` length starts each instance's window anew, and until it holds samples the
    /// instance is routed on its last estimate; a new `rtt-quantile` is computed at the next
    /// choice.
    pub fn retune(&mut self, tuning: Tuning, now: Instant) {
        let old = std::mem::replace(&mut self.tuning, tuning);
        for instance in &mut self.instances {
            if old.rtt_window != tuning.rtt_window {
                instance.window = RttWindow::new(window_shape(tuning.rtt_window), now);
            }
            if old.rtt_quantile != tuning.rtt_quantile
                && let Some((_, value)) = instance.quantile
            {
                // Kept as the last estimate, but too old to be reused while samples exist.
                let stale = now.checked_sub(QUANTILE_REFRESH).unwrap_or(now);
                instance.quantile = Some((stale, value));
            }
        }
    }

    /// An exchange with `key` started at `since` is unanswered: a probe was sent, or a request
    /// outlived its per-try timeout. Until an answer ([`Chooser::answered`]), the age of the
    /// oldest unanswered exchange bounds the RTT estimate from below: a probe that timed out
    /// was not answered either.
    pub fn unanswered(&mut self, key: &K, since: Instant) {
        if let Some(instance) = self.find(key) {
            let oldest = instance.unanswered_since.get_or_insert(since);
            *oldest = (*oldest).min(since);
        }
    }

    /// A probe of `key` was sent at `now`: see [`Chooser::unanswered`].
    pub fn probe_sent(&mut self, key: &K, now: Instant) {
        self.unanswered(key, now);
    }

    /// `key` answered (a probe or a request; its RTT is recorded apart).
    pub fn answered(&mut self, key: &K) {
        self.probe_answered(key);
    }

    /// A probe of `key` was answered (its RTT is recorded apart).
    pub fn probe_answered(&mut self, key: &K) {
        if let Some(instance) = self.find(key) {
            instance.unanswered_since = None;
        }
    }

    /// A request to `key` starts now.
    pub fn start(&mut self, key: &K, now: Instant) {
        if let Some(instance) = self.find(key) {
            instance.started.push_back(now);
        }
    }

    /// Holds `key` out of the choice (`true`) or lets it back in.
    pub fn hold(&mut self, key: &K, held: bool) {
        if let Some(instance) = self.find(key) {
            instance.held = held;
        }
    }

    /// A request to `key` ended, and says nothing of the instance (cancelled, or the client's
    /// fault).
    pub fn release(&mut self, key: &K) {
        if let Some(instance) = self.find(key) {
            instance.ended();
        }
    }

    /// Whether `key` is ejected at `now`.
    pub fn is_ejected(&self, key: &K, now: Instant) -> bool {
        self.instances
            .iter()
            .any(|i| &i.key == key && i.ejected(now))
    }

    /// A request to `key` ended; a failure counts towards ejection.
    pub fn finish(&mut self, key: &K, success: bool, now: Instant) {
        let Some(instance) = self.find(key) else {
            return;
        };
        instance.ended();
        self.outcome(key, success, now);
    }

    /// The outcome of an exchange with `key` that was not a request in flight (a probe); a
    /// failure counts towards ejection, a success forgives past failures.
    pub fn outcome(&mut self, key: &K, success: bool, now: Instant) {
        let tuning = self.tuning;
        let Some(instance) = self.find(key) else {
            return;
        };
        if success {
            // It answers: whatever ejected it is over.
            instance.failures_in_a_row = 0;
            instance.ejections = 0;
            instance.ejected_until = None;
            return;
        }
        instance.failures_in_a_row += 1;
        if instance.failures_in_a_row >= tuning.eject_after {
            let period = tuning
                .first_ejection
                .saturating_mul(1 << instance.ejections.min(16))
                .min(tuning.max_ejection);
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
        random: impl FnMut(usize) -> usize,
    ) -> Decision<K> {
        self.choose_avoiding(now, limits, random, None)
    }

    /// Like [`Chooser::choose`], but `avoid` (the instance a retried request just failed on)
    /// is only picked when it is the only one left.
    pub fn choose_avoiding(
        &mut self,
        now: Instant,
        limits: Limits,
        mut random: impl FnMut(usize) -> usize,
        avoid: Option<&K>,
    ) -> Decision<K> {
        let tuning = self.tuning;
        if tuning.policy == Policy::RoundRobin {
            return self.in_turn(now, avoid);
        }
        // Usable instances by class: within soft, within hard, not measured yet. The buffers
        // live in the chooser so that choosing allocates nothing.
        let Self {
            instances, classes, ..
        } = self;
        classes.iter_mut().for_each(Vec::clear);
        let avoided = |instance: &Instance<K>| avoid == Some(&instance.key);
        let others = instances
            .iter()
            .filter(|i| !i.out(now) && !avoided(i))
            .count();
        for (index, instance) in instances.iter_mut().enumerate() {
            if instance.out(now) || (others > 0 && avoided(instance)) {
                continue;
            }
            match instance.estimate(&tuning, now) {
                Some(rtt) if rtt <= limits.soft_rtt => classes[0].push((index, rtt)),
                Some(rtt) if rtt <= limits.hard_rtt => classes[1].push((index, rtt)),
                Some(_) => {}
                None => classes[2].push((index, Duration::ZERO)),
            }
        }
        let want_nearer = classes[0].is_empty();
        let candidates = classes.iter().find(|c| !c.is_empty());
        let picked = candidates.map(|candidates| {
            match candidates.len() {
                1 => candidates[0],
                n => {
                    // Power of two choices: two distinct candidates, the cheaper one wins.
                    let a = random(n);
                    let b = (a + 1 + random(n - 1)) % n;
                    let cost = |(index, rtt): (usize, Duration)| {
                        let instance: &Instance<K> = &instances[index];
                        let load = match tuning.policy {
                            Policy::RttHistogram => {
                                instance.past_the_network(rtt, tuning.load_after_rtts, now)
                            }
                            _ => instance.in_flight(),
                        };
                        (
                            rtt.as_secs_f64() * f64::from(load + 1),
                            instance.in_flight(),
                        )
                    };
                    if cost(candidates[a]) <= cost(candidates[b]) {
                        candidates[a]
                    } else {
                        candidates[b]
                    }
                }
            }
        });
        Decision {
            pick: picked.map(|(index, _)| instances[index].key.clone()),
            want_nearer,
            // Unmeasured instances are in the list with a zero RTT: that is no estimate.
            pick_rtt: picked.and_then(|(_, rtt)| (!rtt.is_zero()).then_some(rtt)),
        }
    }

    /// Round robin over the instances not ejected or held, RTT ignored.
    fn in_turn(&mut self, now: Instant, avoid: Option<&K>) -> Decision<K> {
        let n = self.instances.len();
        let usable = |i: usize, avoiding: bool| {
            let instance = &self.instances[i];
            let avoided = avoiding && avoid == Some(&instance.key);
            !(instance.out(now) || avoided)
        };
        let in_order = |avoiding| {
            (0..n)
                .map(|step| (self.next_in_turn + step) % n)
                .find(|&i| usable(i, avoiding))
        };
        let pick = in_order(true).or_else(|| in_order(false));
        if let Some(index) = pick {
            self.next_in_turn = (index + 1) % n;
        }
        Decision {
            pick: pick.map(|i| self.instances[i].key.clone()),
            want_nearer: pick.is_none(),
            pick_rtt: None,
        }
    }
}

#[cfg(test)]
mod tests;
