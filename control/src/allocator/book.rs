//! What an allocator knows of its instances, and its decisions about them (pure): whether a
//! start request reuses an instance just started, and whether an instance is culled.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use super::{ports::InstancePorts, protocol::instance};

/// Labels on every container (and in every process's state file), so that an allocator
/// that restarts finds what it started.
pub const LABEL_ALLOCATOR: &str = "mtc.allocator";
/// The label holding the instance's service name.
pub const LABEL_SERVICE: &str = "mtc.service";
/// The label holding the digest of the artifact the instance runs (`sha256:<hex>`).
pub const LABEL_DIGEST: &str = "mtc.digest";
/// The label holding the instance's ports, as `proxy,service,metrics`.
pub const LABEL_PORTS: &str = "mtc.ports";

/// One instance this allocator runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// The runtime's name for it: container ID or process instance name.
    pub id: String,
    /// The service's name in the lookup.
    pub service: String,
    /// The digest of the artifact it runs, as the record names it (`sha256:<hex>`).
    pub digest: String,
    /// The ports the allocator gave it.
    pub ports: InstancePorts,
}

impl Instance {
    /// The labels that name this instance as `allocator`'s.
    pub fn labels(&self, allocator: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            (LABEL_ALLOCATOR.into(), allocator.into()),
            (LABEL_SERVICE.into(), self.service.clone()),
            (LABEL_DIGEST.into(), self.digest.clone()),
            (
                LABEL_PORTS.into(),
                format!(
                    "{},{},{}",
                    self.ports.proxy, self.ports.service, self.ports.metrics
                ),
            ),
        ])
    }

    /// The instance `labels` describe, if they are complete.
    pub fn from_labels(id: &str, labels: &BTreeMap<String, String>) -> Option<Self> {
        let mut ports = labels.get(LABEL_PORTS)?.split(',').map(|p| p.parse().ok());
        let ports = InstancePorts {
            proxy: ports.next()??,
            service: ports.next()??,
            metrics: ports.next()??,
        };
        Some(Self {
            id: id.to_owned(),
            service: labels.get(LABEL_SERVICE)?.clone(),
            digest: labels.get(LABEL_DIGEST)?.clone(),
            ports,
        })
    }
}

/// How instances are culled.
#[derive(Debug, Clone, Copy)]
pub struct CullPolicy {
    /// An instance whose proxy served nothing for this long is stopped.
    pub idle_timeout: Duration,
    /// An instance younger than this is booting and never culled.
    pub boot_grace: Duration,
    /// An instance past its grace whose proxy did not answer this many checks in a row is
    /// gone or hung, and is stopped.
    pub max_missed_checks: u32,
}

/// What [`CullPolicy::verdict`] decides for one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Past its boot grace and in use, or it missed fewer checks than the limit: it stays.
    Keep,
    /// Younger than the boot grace: it stays, whatever its proxy says.
    Booting,
    /// Its proxy served nothing for the idle timeout or longer: it is stopped.
    Idle,
    /// Its proxy missed the maximum number of checks in a row: it is stopped.
    Unresponsive,
}

impl CullPolicy {
    /// What to do with an instance `age` old whose proxy reported `idle` (`None`: it did not
    /// answer, `missed` times in a row now).
    pub fn verdict(&self, age: Duration, idle: Option<Duration>, missed: u32) -> Verdict {
        if age < self.boot_grace {
            return Verdict::Booting;
        }
        match idle {
            Some(idle) if idle >= self.idle_timeout => Verdict::Idle,
            Some(_) => Verdict::Keep,
            None if missed >= self.max_missed_checks => Verdict::Unresponsive,
            None => Verdict::Keep,
        }
    }
}

/// Whether a start request for a service reuses the instance started at `last` (if still
/// running): many proxies asking at once for the same service get one instance.
pub fn reuses(last: Option<Instant>, now: Instant, window: Duration) -> bool {
    last.is_some_and(|at| now.saturating_duration_since(at) < window)
}

/// The value of the idle metric ([`instance::IDLE_METRIC`]) in a Prometheus text exposition.
pub fn idle_from_metrics(text: &str) -> Option<Duration> {
    text.lines()
        .find_map(|line| line.strip_prefix(instance::IDLE_METRIC)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .filter(|secs| secs.is_finite() && *secs >= 0.0)
        .map(Duration::from_secs_f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: CullPolicy = CullPolicy {
        idle_timeout: Duration::from_secs(60),
        boot_grace: Duration::from_secs(30),
        max_missed_checks: 3,
    };
    const S: Duration = Duration::from_secs(1);

    #[test]
    fn booting_instances_are_never_culled() {
        assert_eq!(POLICY.verdict(S * 29, Some(S * 600), 0), Verdict::Booting);
        assert_eq!(POLICY.verdict(S * 29, None, 10), Verdict::Booting);
    }

    #[test]
    fn idle_and_unresponsive_instances_are_culled_after_the_grace() {
        assert_eq!(POLICY.verdict(S * 31, Some(S * 59), 0), Verdict::Keep);
        assert_eq!(POLICY.verdict(S * 31, Some(S * 60), 0), Verdict::Idle);
        assert_eq!(POLICY.verdict(S * 31, None, 2), Verdict::Keep);
        assert_eq!(POLICY.verdict(S * 31, None, 3), Verdict::Unresponsive);
    }

    #[test]
    fn a_start_soon_after_another_reuses_it() {
        let t0 = Instant::now();
        assert!(!reuses(None, t0, S * 10));
        assert!(reuses(Some(t0), t0 + S * 9, S * 10));
        assert!(!reuses(Some(t0), t0 + S * 10, S * 10));
    }

    #[test]
    fn labels_round_trip_and_incomplete_ones_are_not_ours() {
        let instance = Instance {
            id: "c0ffee".into(),
            service: "hello".into(),
            digest: "sha256:ab".into(),
            ports: InstancePorts {
                proxy: 20000,
                service: 20001,
                metrics: 20002,
            },
        };
        let labels = instance.labels("12D3Koo");
        assert_eq!(labels[LABEL_ALLOCATOR], "12D3Koo");
        assert_eq!(Instance::from_labels("c0ffee", &labels), Some(instance));
        let mut broken = labels;
        broken.insert(LABEL_PORTS.into(), "1,2".into());
        assert_eq!(Instance::from_labels("c0ffee", &broken), None);
    }

    #[test]
    fn idle_time_is_read_from_the_proxys_metrics() {
        let text = "# HELP x\nproxy_seconds_since_last_request 12.5\nother 1\n";
        assert_eq!(idle_from_metrics(text), Some(Duration::from_millis(12_500)));
        assert_eq!(idle_from_metrics("nothing"), None);
        assert_eq!(
            idle_from_metrics("proxy_seconds_since_last_request NaN"),
            None
        );
    }
}
