//! What a proxy reports on `/metrics`: requests by service and status class, their latency,
//! retries and allocations asked (counted as they happen); the RTT quantiles, in-flight
//! requests and ejection of every known instance, and the seconds since the last served
//! request (read from the live state when scraped, so nothing is updated per request that no
//! one reads).

use std::{
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use http::StatusCode;
use mtc_overlay::allocator::protocol::instance;
use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGaugeVec, Opts, Registry,
    core::{Collector, Desc},
    proto::MetricFamily,
};

use crate::{
    ingress::{InstanceReport, limits::Limit},
    upgrade::UpgradeMetrics,
};

/// When the proxy last served a request. The allocator culls an instance whose sidecar has
/// served nothing for its idle timeout, so this is exported as seconds since then (since start
/// before the first request). A proxy with a request or tunnel in flight is not idle, however
/// long it has been open; idle time counts from when the last one ended.
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
        // Idle from the end of the last request, not its start (a tunnel may last hours).
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Activity {
    /// Activity from now: nothing served yet, idle since now.
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
        self.touch();
        self.served.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Serving(self)
    }

    /// Requests being served now (a shutdown waits for them).
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Marks now as the last moment something was served.
    fn touch(&self) {
        let millis = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_millis.fetch_max(millis, Ordering::Relaxed);
    }

    /// Time since the last request ended (or since start) at `now`; zero while one is in
    /// flight.
    pub fn idle(&self, now: Instant) -> Duration {
        if self.in_flight() > 0 {
            return Duration::ZERO;
        }
        let last = self.started + Duration::from_millis(self.last_millis.load(Ordering::Relaxed));
        now.saturating_duration_since(last)
    }

    /// Requests begun since start ([`Activity::serve`] calls), as ingress or as sidecar; a
    /// sidecar's layer-4 tunnels count too.
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
    limits: IntCounterVec,
    connections: IntCounterVec,
    /// This worker's series of `connections`.
    accepted: IntCounter,
    /// Upgraded exchanges (WebSocket, ...), at the ingress and at the sidecar.
    pub upgrades: UpgradeMetrics,
}

/// Label of requests for a service that does not exist: client-chosen names must not create
/// series without bound.
pub const UNKNOWN_SERVICE: &str = "";

/// What became of a failed attempt that could have gone elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryOutcome {
    /// Sent to another instance.
    Taken,
    /// Not: the retry budget was spent.
    OverBudget,
    /// Not: the request had had perf.conf's `max-attempts` tries.
    MaxAttempts,
}

impl IngressMetrics {
    /// Creates the ingress's series (`proxy_requests_total`, `proxy_request_duration_seconds`,
    /// `proxy_retries_total`, `proxy_allocations_total`, `proxy_connections_accepted_total`,
    /// and the upgrades' of [`UpgradeMetrics`]) in `registry`; connections count as worker 0's ([`IngressMetrics::for_worker`] gives
    /// another worker's).
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
                "Failed attempts retried on another instance (taken) or not (over_budget, \
                 max_attempts), and \
                 overdue ones sent to a second instance too (hedged)",
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
        let connections = IntCounterVec::new(
            Opts::new(
                "proxy_connections_accepted_total",
                "Client connections the ingress accepted, by worker (--worker-threads; the \
                 kernel spreads connections over the workers' listeners)",
            ),
            &["worker"],
        )?;
        registry.register(Box::new(connections.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(retries.clone()))?;
        registry.register(Box::new(allocations.clone()))?;
        let limits = IntCounterVec::new(
            Opts::new(
                "proxy_limit_hits_total",
                "Times a limit on what one client may hold was hit: client_connections \
                 (--max-client-connections), head_bytes (--max-head-bytes), head_time \
                 (--head-timeout); and peer_streams: a request waited for an instance's \
                 limit of concurrent QUIC streams (1024)",
            ),
            &["limit"],
        )?;
        for limit in Limit::ALL {
            limits.with_label_values(&[limit.label()]);
        }
        registry.register(Box::new(limits.clone()))?;
        Ok(Self {
            requests,
            latency,
            retries,
            allocations,
            limits,
            accepted: connections.with_label_values(&["0"]),
            connections,
            upgrades: UpgradeMetrics::register(registry)?,
        })
    }

    /// The same series, with connections counted as accepted by worker `index`.
    pub fn for_worker(&self, index: usize) -> Self {
        Self {
            accepted: self.connections.with_label_values(&[&index.to_string()]),
            ..self.clone()
        }
    }

    /// A client hit `limit`.
    pub fn limit_hit(&self, limit: Limit) {
        self.limits.with_label_values(&[limit.label()]).inc();
    }

    /// A client connection was accepted.
    pub fn accepted(&self) {
        self.accepted.inc();
    }

    /// The request series of `service`, to be kept (by its record) and counted on. Its
    /// retry series start at zero, so that a rate over them reads 0 rather than nothing.
    pub fn series(&self, service: &str) -> ServiceSeries {
        for outcome in ["taken", "over_budget", "max_attempts", "hedged"] {
            self.retries.with_label_values(&[service, outcome]);
        }
        ServiceSeries {
            service: service.to_owned(),
            requests: self.requests.clone(),
            classes: Default::default(),
            latency: self.latency.with_label_values(&[service]),
        }
    }

    /// A failed attempt of `service` that could go elsewhere was retried (`taken`), or was not:
    /// for lack of retry budget (`over_budget`), or because the request had had its
    /// `max-attempts` tries (`max_attempts`).
    pub fn retried(&self, service: &str, outcome: RetryOutcome) {
        let outcome = match outcome {
            RetryOutcome::Taken => "taken",
            RetryOutcome::OverBudget => "over_budget",
            RetryOutcome::MaxAttempts => "max_attempts",
        };
        self.retries.with_label_values(&[service, outcome]).inc();
    }

    /// An overdue idempotent request was sent to a second instance as well.
    pub fn hedged(&self, service: &str) {
        self.retries.with_label_values(&[service, "hedged"]).inc();
    }

    /// An allocation for `service` ended: `reason` is `none` or `nearer`
    /// ([`crate::ingress::Reason::label`]), `started` whether an instance was started.
    pub fn allocation(&self, service: &str, reason: &str, started: bool) {
        let outcome = if started { "started" } else { "failed" };
        self.allocations
            .with_label_values(&[service, reason, outcome])
            .inc();
    }
}

/// The request series of one service, looked up once rather than per request: a lookup by
/// label values hashes them and takes the metric family's lock, which every worker shares.
#[derive(Debug)]
pub struct ServiceSeries {
    service: String,
    requests: IntCounterVec,
    /// `requests` of each status class, made on its first request (no series of zeros).
    classes: [OnceLock<IntCounter>; 5],
    latency: Histogram,
}

impl ServiceSeries {
    /// A request answered with `status` after `elapsed`.
    pub fn answered(&self, status: StatusCode, elapsed: Duration) {
        const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        self.classes[class]
            .get_or_init(|| {
                self.requests
                    .with_label_values(&[self.service.as_str(), CLASSES[class]])
            })
            .inc();
        self.latency.observe(elapsed.as_secs_f64());
    }
}

/// The instances of one service as the chooser sees them.
pub struct ServiceView {
    /// The service's name.
    pub service: String,
    /// What the routing core knows of each of its instances, keyed by overlay peer id.
    pub instances: Vec<InstanceReport<libp2p::PeerId>>,
}

/// Gauges filled from live state at scrape time.
pub struct LiveCollector<F> {
    snapshot: F,
    activity: Arc<Activity>,
    rtt: GaugeVec,
    service_time: GaugeVec,
    down: IntGaugeVec,
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
                    "Network RTT quantiles of each instance over the routing window (probes and \
                     the QUIC path RTT of requests; service time excluded)",
                ),
                &["service", "instance", "quantile"],
            )?,
            service_time: GaugeVec::new(
                Opts::new(
                    "proxy_instance_service_time_seconds",
                    "Quantiles of each instance's service time over the last 10 s (request time \
                     less the network RTT): a load signal, never a reason to allocate",
                ),
                &["service", "instance", "quantile"],
            )?,
            down: IntGaugeVec::new(
                Opts::new(
                    "proxy_instance_service_down",
                    "1 while an instance's sidecar says its service does not answer",
                ),
                instance_labels,
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
                instance::IDLE_METRIC,
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
            self.service_time.desc(),
            self.down.desc(),
            self.in_flight.desc(),
            self.ejected.desc(),
            self.idle.desc(),
            self.served.desc(),
        ]
        .concat()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.rtt.reset();
        self.service_time.reset();
        self.down.reset();
        self.in_flight.reset();
        self.ejected.reset();
        for view in (self.snapshot)() {
            for report in view.instances {
                let instance = &report.view;
                let peer = instance.key.to_string();
                let labels = [view.service.as_str(), peer.as_str()];
                // With several workers each measures on its own; the last one read is shown.
                for (gauge, quantiles) in [
                    (&self.rtt, instance.quantiles),
                    (&self.service_time, report.service_time),
                ] {
                    for (q, value) in ["0.5", "0.9", "0.99"]
                        .into_iter()
                        .zip(quantiles.into_iter().flatten())
                    {
                        gauge
                            .with_label_values(&[labels[0], labels[1], q])
                            .set(value.as_secs_f64());
                    }
                }
                // Several workers may know one instance: its requests in flight are summed,
                // it is down or ejected if any worker says so.
                let down = self.down.with_label_values(&labels);
                down.set(down.get().max(i64::from(report.down)));
                self.in_flight
                    .with_label_values(&labels)
                    .add(i64::from(instance.in_flight));
                let ejected = self.ejected.with_label_values(&labels);
                ejected.set(ejected.get().max(i64::from(instance.ejected)));
            }
        }
        self.idle
            .set(self.activity.idle(Instant::now()).as_secs_f64());
        self.served
            // Saturating: two scrapes at once may both read the counter before either adds.
            .inc_by(self.activity.served().saturating_sub(self.served.get()));
        [
            self.rtt.collect(),
            self.service_time.collect(),
            self.down.collect(),
            self.in_flight.collect(),
            self.ejected.collect(),
            self.idle.collect(),
            self.served.collect(),
        ]
        .concat()
    }
}

/// What a sidecar knows of itself when scraped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SidecarView {
    /// Probes answered since start.
    pub probes_answered: u64,
    /// Whether its service answers (not while starting or down).
    pub service_up: bool,
}

/// The series of a sidecar: `proxy_probes_answered_total` and `proxy_service_up`, read from
/// the sidecar's live state when scraped (nothing is updated per probe that no one reads).
pub struct SidecarCollector<F> {
    view: F,
    probes: IntCounter,
    up: prometheus::IntGauge,
}

impl<F: Fn() -> SidecarView + Send + Sync + 'static> SidecarCollector<F> {
    /// Registers the sidecar's series, read from `view`.
    pub fn register(registry: &Registry, view: F) -> prometheus::Result<()> {
        let collector = Self {
            view,
            probes: IntCounter::new(
                "proxy_probes_answered_total",
                "Probes this proxy answered as the sidecar of its service",
            )?,
            up: prometheus::IntGauge::new(
                "proxy_service_up",
                "1 while this sidecar's service answers, 0 while it is starting or down",
            )?,
        };
        registry.register(Box::new(collector))
    }
}

impl<F: Fn() -> SidecarView + Send + Sync + 'static> Collector for SidecarCollector<F> {
    fn desc(&self) -> Vec<&Desc> {
        [self.probes.desc(), self.up.desc()].concat()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let view = (self.view)();
        self.probes
            .inc_by(view.probes_answered.saturating_sub(self.probes.get()));
        self.up.set(i64::from(view.service_up));
        [self.probes.collect(), self.up.collect()].concat()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::select::InstanceView;

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
        // Issue 16: a request or tunnel open for longer than any idle timeout keeps the
        // proxy busy (it was culled as idle while serving), and idle time counts from its end.
        let long = activity.serve();
        assert_eq!(
            activity.idle(Instant::now() + Duration::from_secs(3600)),
            Duration::ZERO
        );
        drop(long);
        let idle = activity.idle(Instant::now() + Duration::from_secs(3600));
        assert!(idle >= Duration::from_secs(3600) && idle < Duration::from_secs(3601));
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
                instances: vec![InstanceReport {
                    view: InstanceView {
                        key: peer,
                        quantiles: Some([Duration::from_millis(1); 3]),
                        in_flight: 2,
                        ejected: false,
                    },
                    service_time: Some([Duration::from_millis(150); 3]),
                    down: false,
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
        let line = format!(
            "proxy_instance_service_time_seconds{{instance=\"{peer}\",quantile=\"0.5\",service=\"hello\"}} 0.15"
        );
        assert!(text.contains(&line), "{text}");
    }
}
