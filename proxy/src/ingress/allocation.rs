//! Asking allocators for instances: when a service has none, or when its best one is over the
//! soft RTT limit. One allocation per service at a time, however many requests wait for it;
//! after one fails, the next of its kind waits a cool-down so a failing allocator is not asked
//! in a loop; after a nearer instance was started, the next nearer one waits longer, since a
//! new instance takes a moment to be measured. A service left with no instance after one was
//! started (it was culled, or died) gets the next at once.
//!
//! An allocator that cannot be reached (killed: a clean stop withdraws its provider record, but
//! a killed one's outlives it by up to the record lifetime) is [`Unreachable`]: asked last,
//! after every other, until that lifetime has passed, so that no allocation waits on it first.

use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::PeerId;
use mtc_overlay::{
    allocator::protocol::{NAMESPACE, StartProtocol, StartRequest, StartResponse},
    lookup::ServiceRecord,
    overlay::Node,
    rpc::NodeInfoProtocol,
};

use crate::config::perf::Tuning;

/// How long allocators are searched for on the overlay.
const FIND_ALLOCATORS: Duration = Duration::from_secs(3);

/// Why an instance is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The service has no usable instance.
    NoInstance,
    /// The best instance is over the soft limit: only an allocator nearer than this helps
    /// ([`super::routing::nearer_than`]).
    Nearer(Duration),
}

impl Reason {
    /// The `reason` label of `proxy_allocations_total`: `none` or `nearer`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::NoInstance => "none",
            Self::Nearer(_) => "nearer",
        }
    }

    /// `allocation-retry` after one for a service with none, `nearer-retry` after one for a
    /// nearer instance.
    fn cool_down(&self, tuning: &Tuning) -> Duration {
        match self {
            Self::NoInstance => tuning.allocation_retry,
            Self::Nearer(_) => tuning.nearer_retry,
        }
    }
}

/// Why no instance could be had from the allocators.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocationError {
    #[error("no allocator found on the overlay")]
    NoAllocator,
    #[error("no allocator is nearer than {0:?}")]
    NoneNearer(Duration),
    /// Every allocator asked refused or failed: each one's reason.
    #[error("every allocator refused: {}", .0.join("; "))]
    Refused(Vec<String>),
    #[error(
        "allocator {allocator} started instance {instance}, but its proxy did not appear \
         within {waited:?}"
    )]
    NotAppeared {
        allocator: PeerId,
        instance: String,
        waited: Duration,
    },
}

/// Whether an allocation starts now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    /// Yes: the caller runs it and calls [`AllocationState::end`].
    Start,
    /// One is running; its end will be announced.
    Running,
    /// The last one failed a moment ago, for this reason; none starts before the cool-down.
    Failed(AllocationError),
    /// The last nearer-instance allocation succeeded a moment ago; none starts before the
    /// cool-down.
    Recent,
}

/// The allocation state of one service (pure).
#[derive(Debug, Default)]
pub struct AllocationState {
    running: bool,
    /// When the last allocation ended, why it was asked for, and its failure if it failed.
    last: Option<(Instant, Reason, Option<AllocationError>)>,
}

impl AllocationState {
    pub fn begin(&mut self, reason: Reason, tuning: &Tuning, now: Instant) -> Begin {
        if self.running {
            return Begin::Running;
        }
        if let Some((ended, last_reason, failure)) = &self.last {
            // A nearer-instance request never holds back one for a service with none.
            let same_kind = last_reason.label() == reason.label();
            if same_kind && now.saturating_duration_since(*ended) < reason.cool_down(tuning) {
                match (failure, reason) {
                    (Some(failure), _) => return Begin::Failed(failure.clone()),
                    (None, Reason::Nearer(_)) => return Begin::Recent,
                    // The instance it started is gone already: another, now.
                    (None, Reason::NoInstance) => {}
                }
            }
        }
        self.running = true;
        Begin::Start
    }

    pub fn end(&mut self, reason: Reason, result: Result<(), AllocationError>, now: Instant) {
        self.running = false;
        self.last = Some((now, reason, result.err()));
    }

    /// The failure of an allocation that ended after `since`.
    pub fn failure_since(&self, since: Instant) -> Option<&AllocationError> {
        match &self.last {
            Some((ended, _, Some(failure))) if *ended >= since => Some(failure),
            _ => None,
        }
    }
}

/// Allocators that could not be reached, each until when it is asked last (pure: the time is
/// a parameter).
#[derive(Debug, Default)]
pub struct Unreachable {
    until: std::collections::HashMap<PeerId, Instant>,
}

impl Unreachable {
    /// Notes that `allocator` could not be reached at `now`: it is asked last until `now +
    /// lasting`.
    pub fn failed(&mut self, allocator: PeerId, now: Instant, lasting: Duration) {
        self.until.insert(allocator, now + lasting);
    }

    /// Notes that `allocator` answered: it is asked in its place again.
    pub fn answered(&mut self, allocator: &PeerId) {
        self.until.remove(allocator);
    }

    /// Reorders `by_rtt` (nearest first) so that the allocators unreachable at `now` come
    /// last, in their order; forgets those whose time is up.
    pub fn order<T>(&mut self, by_rtt: &mut [(T, PeerId)], now: Instant) {
        self.until.retain(|_, until| *until > now);
        by_rtt.sort_by_key(|(_, peer)| self.until.contains_key(peer));
    }
}

/// Asks the allocators on the overlay, nearest first (those in `unreachable` last), to start
/// an instance of `record`; returns the allocator that did and its name for the instance. For
/// [`Reason::Nearer`] only allocators nearer than the given RTT are asked. An allocator that
/// cannot be reached is noted in `unreachable` for the provider record lifetime.
pub async fn ask_allocators(
    node: &Node,
    record: &ServiceRecord,
    reason: Reason,
    unreachable: &std::sync::Mutex<Unreachable>,
) -> Result<(PeerId, String), AllocationError> {
    let lock = || unreachable.lock().unwrap_or_else(|p| p.into_inner());
    let mut allocators = Vec::new();
    let mut found = node.find_providers(NAMESPACE).await;
    let search = async {
        while let Some(peer) = found.next().await {
            allocators.push(peer);
        }
    };
    let _ = tokio::time::timeout(FIND_ALLOCATORS, search).await;
    if allocators.is_empty() {
        return Err(AllocationError::NoAllocator);
    }
    let mut by_rtt = Vec::with_capacity(allocators.len());
    for peer in allocators {
        if let Some(rtt) = rtt_to(node, peer).await {
            by_rtt.push((rtt, peer));
        }
    }
    by_rtt.sort();
    if let Reason::Nearer(limit) = reason {
        by_rtt.retain(|(rtt, _)| *rtt < limit);
        if by_rtt.is_empty() {
            return Err(AllocationError::NoneNearer(limit));
        }
    }
    lock().order(&mut by_rtt, Instant::now());
    let request = StartRequest {
        service: record.name.clone(),
        digest: record.digest.to_string(),
    };
    let mut failures = Vec::new();
    for (_, allocator) in by_rtt {
        // A connection that broke under the request is worth one more try: the allocator
        // may well have answered on a fresh one.
        let answer = match node.request::<StartProtocol>(allocator, &request).await {
            Err(error) => {
                tracing::debug!(%allocator, %error, "start request failed, asking again");
                node.request::<StartProtocol>(allocator, &request).await
            }
            answer => answer,
        };
        match answer {
            Ok(StartResponse::Started { instance, .. }) => {
                lock().answered(&allocator);
                tracing::info!(service = %record.name, %allocator, %instance, "instance started");
                return Ok((allocator, instance));
            }
            Ok(StartResponse::Refused(why)) => {
                lock().answered(&allocator);
                failures.push(format!("{allocator}: {why}"));
            }
            Err(error) => {
                let lasting = node.timing().provider_ttl;
                lock().failed(allocator, Instant::now(), lasting);
                failures.push(format!("{allocator}: {error}"));
            }
        }
    }
    Err(AllocationError::Refused(failures))
}

/// The overlay RTT to `peer`: the ping monitor's average if there is one, else the time of a
/// node-info round trip; `None` if it does not answer.
async fn rtt_to(node: &Node, peer: PeerId) -> Option<Duration> {
    if let Some(stats) = node.rtt(&peer) {
        return Some(stats.ewma);
    }
    let begin = Instant::now();
    node.request::<NodeInfoProtocol>(peer, &())
        .await
        .ok()
        .map(|_| begin.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Tuning = Tuning::DEFAULT;
    const RETRY_NONE: Duration = T.allocation_retry;
    const RETRY_NEARER: Duration = T.nearer_retry;

    #[test]
    fn an_unreachable_allocator_is_asked_last_until_its_record_would_have_lapsed() {
        let t0 = Instant::now();
        let [near, middle, far] = [PeerId::random(), PeerId::random(), PeerId::random()];
        let found = [(1, near), (2, middle), (3, far)];
        let mut unreachable = Unreachable::default();
        unreachable.failed(near, t0, Duration::from_secs(120));
        let mut order = found;
        unreachable.order(&mut order, t0 + Duration::from_secs(1));
        assert_eq!(order, [(2, middle), (3, far), (1, near)]);
        // Its record has lapsed (or it came back): nearest first again.
        let mut order = found;
        unreachable.order(&mut order, t0 + Duration::from_secs(120));
        assert_eq!(order, found);
        unreachable.failed(middle, t0, Duration::from_secs(120));
        unreachable.answered(&middle);
        let mut order = found;
        unreachable.order(&mut order, t0);
        assert_eq!(order, found);
    }

    #[test]
    fn one_allocation_at_a_time_and_a_cool_down_after_each() {
        let t0 = Instant::now();
        let mut state = AllocationState::default();
        assert_eq!(state.begin(Reason::NoInstance, &T, t0), Begin::Start);
        assert_eq!(state.begin(Reason::NoInstance, &T, t0), Begin::Running);
        assert_eq!(
            state.begin(Reason::Nearer(Duration::from_millis(30)), &T, t0),
            Begin::Running
        );
        state.end(Reason::NoInstance, Err(AllocationError::NoAllocator), t0);
        assert_eq!(
            state.begin(Reason::NoInstance, &T, t0 + Duration::from_millis(10)),
            Begin::Failed(AllocationError::NoAllocator)
        );
        assert_eq!(state.failure_since(t0), Some(&AllocationError::NoAllocator));
        assert_eq!(state.failure_since(t0 + Duration::from_millis(1)), None);
        assert_eq!(
            state.begin(Reason::NoInstance, &T, t0 + RETRY_NONE),
            Begin::Start
        );
        state.end(Reason::NoInstance, Ok(()), t0 + RETRY_NONE);
        // A success holds nothing back: with no instance again, another is asked for at once.
        assert_eq!(
            state.begin(Reason::NoInstance, &T, t0 + RETRY_NONE),
            Begin::Start
        );
    }

    #[test]
    fn a_nearer_allocation_cools_down_longer_and_does_not_hold_back_a_missing_one() {
        let t0 = Instant::now();
        let nearer = Reason::Nearer(Duration::from_millis(40));
        let mut state = AllocationState::default();
        assert_eq!(state.begin(nearer, &T, t0), Begin::Start);
        state.end(nearer, Ok(()), t0);
        assert_eq!(state.begin(nearer, &T, t0 + RETRY_NONE), Begin::Recent);
        assert_eq!(state.begin(Reason::NoInstance, &T, t0), Begin::Start);
        state.end(Reason::NoInstance, Ok(()), t0);
        assert_eq!(state.begin(nearer, &T, t0 + RETRY_NEARER), Begin::Start);
    }
}
