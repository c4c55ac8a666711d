//! What a proxy reports on `/metrics`: requests by service and status class, their latency,
//! retries and allocations asked (counted as they happen); the RTT quantiles, in-flight
//! requests and ejection of every known instance, and the seconds since the last served
//! request (read from the live state when scraped, so nothing is updated per request that no
//! one reads).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use http::StatusCode;
use prometheus::{
    Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry,
    core::{Collector, Desc},
    proto::MetricFamily,
};

use crate::select::InstanceView;

/// When the proxy last served a request. The allocator culls an instance whose sidecar has
/// served nothing for its idle timeout, so this is exported as seconds since then (since start
/// before the first request).
#[derive(Debug)]
pub struct Activity {
    started: Instant,
    /// Milliseconds from `started` to the last request.
    last_millis: AtomicU64,
    served: AtomicU64,
    in_flight: AtomicU64,
}

/// A request being served; counted in [`Activity::in_flight`] until dropped.
pub struct Serving<'a>(&'a Activity);

impl Drop for Serving<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            started: Instant::now(),
            last_millis: AtomicU64::new(0),
            served: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
        })
    }

    /// A request is being served, until the returned guard is dropped.
    pub fn serve(&self) -> Serving<'_> {
        let millis = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_millis.fetch_max(millis, Ordering::Relaxed);
        self.served.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Serving(self)
    }

    /// Requests being served now (a shutdown waits for them).
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Time since the last request (or since start) at `now`.
    pub fn idle(&self, now: Instant) -> Duration {
        let last = self.started + Duration::from_millis(self.last_millis.load(Ordering::Relaxed));
        now.saturating_duration_since(last)
    }

    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

/// Counters and histograms of the ingress, updated per request.
#[derive(Clone)]
pub struct IngressMetrics {
    requests: IntCounterVec,
    latency: HistogramVec,
    retries: IntCounterVec,
    allocations: IntCounterVec,
}

/// Label of requests for a service that does not exist: client-chosen names must not create
/// series without bound.
pub const UNKNOWN_SERVICE: &str = "";

impl IngressMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let requests = IntCounterVec::new(
            Opts::new(
                "proxy_requests_total",
                "Requests answered by the ingress, by service and status class (2xx, 4xx, ...)",
            ),
            &["service", "class"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "proxy_request_duration_seconds",
                "Time from a request's arrival at the ingress to its response head, by service",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
            &["service"],
        )?;
        let retries = IntCounterVec::new(
            Opts::new(
                "proxy_retries_total",
                "Failed attempts retried on another instance (taken) or not (over_budget)",
            ),
            &["service", "outcome"],
        )?;
        let allocations = IntCounterVec::new(
            Opts::new(
                "proxy_allocations_total",
                "Instances asked of allocators: reason none (no instance) or nearer (best one \
                 over the soft limit); outcome started or failed",
            ),
            &["service", "reason", "outcome"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(retries.clone()))?;
        registry.register(Box::new(allocations.clone()))?;
        Ok(Self {
            requests,
            latency,
            retries,
            allocations,
        })
    }

    /// A request answered with `status` after `elapsed`.
    pub fn answered(&self, service: &str, status: StatusCode, elapsed: Duration) {
        let class = match status.as_u16() / 100 {
            1 => "1xx",
            2 => "2xx",
            3 => "3xx",
            4 => "4xx",
            _ => "5xx",
        };
        self.requests.with_label_values(&[service, class]).inc();
        self.latency
            .with_label_values(&[service])
            .observe(elapsed.as_secs_f64());
    }

    pub fn retried(&self, service: &str, taken: bool) {
        let outcome = if taken { "taken" } else { "over_budget" };
        self.retries.with_label_values(&[service, outcome]).inc();
    }

    pub fn allocation(&self, service: &str, reason: &str, started: bool) {
        let outcome = if started { "started" } else { "failed" };
        self.allocations
            .with_label_values(&[service, reason, outcome])
            .inc();
    }
}

/// The instances of one service as the chooser sees them.
pub struct ServiceView {
    pub service: String,
    pub instances: Vec<InstanceView<libp2p::PeerId>>,
}

/// Gauges filled from live state at scrape time.
pub struct LiveCollector<F> {
    snapshot: F,
    activity: Arc<Activity>,
    rtt: GaugeVec,
    in_flight: IntGaugeVec,
    ejected: IntGaugeVec,
    idle: Gauge,
    served: IntCounter,
}

impl<F: Fn() -> Vec<ServiceView> + Send + Sync + 'static> LiveCollector<F> {
    /// Registers gauges read from `snapshot` (the instances) and `activity`.
    pub fn register(
        registry: &Registry,
        activity: Arc<Activity>,
        snapshot: F,
    ) -> prometheus::Result<()> {
        let instance_labels = &["service", "instance"];
        let collector = Self {
            snapshot,
            activity,
            rtt: GaugeVec::new(
                Opts::new(
                    "proxy_instance_rtt_seconds",
                    "RTT quantiles of each instance over the routing window (probes and requests)",
                ),
                &["service", "instance", "quantile"],
            )?,
            in_flight: IntGaugeVec::new(
                Opts::new(
                    "proxy_instance_in_flight",
                    "Requests in flight per instance",
                ),
                instance_labels,
            )?,
            ejected: IntGaugeVec::new(
                Opts::new(
                    "proxy_instance_ejected",
                    "1 while an instance is ejected for failing",
                ),
                instance_labels,
            )?,
            idle: Gauge::new(
                "proxy_seconds_since_last_request",
                "Seconds since this proxy last served a request (since start before the first); \
                 the allocator culls idle instances on it",
            )?,
            served: IntCounter::new(
                "proxy_served_requests_total",
                "Requests this proxy served, as ingress or as sidecar",
            )?,
        };
        registry.register(Box::new(collector))
    }
}

impl<F: Fn() -> Vec<ServiceView> + Send + Sync + 'static> Collector for LiveCollector<F> {
    fn desc(&self) -> Vec<&Desc> {
        [
            self.rtt.desc(),
            self.in_flight.desc(),
            self.ejected.desc(),
            self.idle.desc(),
            self.served.desc(),
        ]
        .concat()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.rtt.reset();
        self.in_flight.reset();
        self.ejected.reset();
        for view in (self.snapshot)() {
            for instance in view.instances {
                let peer = instance.key.to_string();
                let labels = [view.service.as_str(), peer.as_str()];
                if let Some(quantiles) = instance.quantiles {
                    for (q, value) in ["0.5", "0.9", "0.99"].into_iter().zip(quantiles) {
                        self.rtt
                            .with_label_values(&[labels[0], labels[1], q])
                            .set(value.as_secs_f64());
                    }
                }
                self.in_flight
                    .with_label_values(&labels)
                    .set(i64::from(instance.in_flight));
                self.ejected
                    .with_label_values(&labels)
                    .set(i64::from(instance.ejected));
            }
        }
        self.idle
            .set(self.activity.idle(Instant::now()).as_secs_f64());
        self.served
            .inc_by(self.activity.served() - self.served.get());
        [
            self.rtt.collect(),
            self.in_flight.collect(),
            self.ejected.collect(),
            self.idle.collect(),
            self.served.collect(),
        ]
        .concat()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activity_measures_idle_time_from_the_last_request() {
        let activity = Activity::new();
        let start = activity.started;
        assert_eq!(activity.idle(start + Duration::from_secs(5)).as_secs(), 5);
        let serving = activity.serve();
        assert_eq!(activity.in_flight(), 1);
        drop(serving);
        assert_eq!(activity.in_flight(), 0);
        assert!(activity.idle(Instant::now() + Duration::from_secs(1)) < Duration::from_secs(2));
        assert_eq!(activity.served(), 1);
    }

    #[test]
    fn the_live_collector_exports_instances_and_idle_time() {
        let registry = Registry::new();
        let activity = Activity::new();
        drop(activity.serve());
        let peer = libp2p::PeerId::random();
        LiveCollector::register(&registry, Arc::clone(&activity), move || {
            vec![ServiceView {
                service: "hello".into(),
                instances: vec![InstanceView {
                    key: peer,
                    quantiles: Some([Duration::from_millis(1); 3]),
                    in_flight: 2,
                    ejected: false,
                }],
            }]
        })
        .unwrap();
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .unwrap();
        let line = format!("proxy_instance_in_flight{{instance=\"{peer}\",service=\"hello\"}} 2");
        assert!(text.contains(&line), "{text}");
        assert!(text.contains("proxy_served_requests_total 1"), "{text}");
        assert!(
            text.contains("proxy_instance_rtt_seconds{instance"),
            "{text}"
        );
        assert!(text.contains("proxy_seconds_since_last_request "), "{text}");
    }
}
