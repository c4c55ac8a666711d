//! RTT table -> Prometheus families and the `/peers` JSON view.
//!
//! Series names are the original ping-monitor's, so existing dashboards keep working:
//! `ping_rtt` and `ping_ewma_rtt` (milliseconds) labelled `targetHost` (the peer ID) and `host`
//! (this monitor's hostname). Prometheus's linter wants snake_case label names; the seed's
//! camelCase `targetHost` is kept by default for compatibility, and [`LabelStyle::Snake`]
//! (`--metric-labels snake`) writes `target_host` instead for a lint-clean exposition. `ping_rtt_window` adds a summary of the sliding window (p50, p90,
//! p99, sum and count). The families are built at scrape time straight from the table, so a
//! peer that expires from the table disappears from the metrics with no bookkeeping.

use std::{sync::Arc, time::Instant};

use libp2p::PeerId;
use prometheus::{
    core::{Collector, Desc},
    proto::{Gauge, LabelPair, Metric, MetricFamily, MetricType, Quantile, Summary},
};

use crate::rtt::{RttStats, RttTable};

const RTT: &str = "ping_rtt";
const EWMA: &str = "ping_ewma_rtt";
const WINDOW: &str = "ping_rtt_window";
const PEERS: &str = "ping_peers";

/// How the label naming the measured peer is spelled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LabelStyle {
    /// `targetHost`, as the original ping-monitor wrote it.
    #[default]
    Seed,
    /// `target_host`, as Prometheus's naming conventions (and `promtool`) want it.
    Snake,
}

impl LabelStyle {
    fn peer_label(self) -> &'static str {
        match self {
            Self::Seed => "targetHost",
            Self::Snake => "target_host",
        }
    }
}

/// Exports an [`RttTable`] with the seed-compatible metric names.
pub struct RttCollector {
    table: Arc<RttTable>,
    host: String,
    peer_label: &'static str,
    descs: Vec<Desc>,
}

impl RttCollector {
    /// A collector of `table` whose series carry `host` as their `host` label and name the
    /// peer in the label `style` spells.
    pub fn new(table: Arc<RttTable>, host: String, style: LabelStyle) -> Self {
        let peer_label = style.peer_label();
        let labels = || vec![peer_label.to_owned(), "host".to_owned()];
        let desc = |name: &str, help: &str, labels: Vec<String>| {
            Desc::new(name.to_owned(), help.to_owned(), labels, Default::default())
                .expect("constant metric descriptions are valid")
        };
        let descs = vec![
            desc(
                RTT,
                "Latest ping round-trip time to the peer, in milliseconds.",
                labels(),
            ),
            desc(
                EWMA,
                "Exponentially weighted moving average (alpha 0.1) of the ping RTT, in milliseconds.",
                labels(),
            ),
            desc(
                WINDOW,
                "Ping RTTs of the sliding window, in milliseconds.",
                labels(),
            ),
            desc(
                PEERS,
                "Peers with a recent RTT sample.",
                vec!["host".to_owned()],
            ),
        ];
        Self {
            table,
            host,
            peer_label,
            descs,
        }
    }
}

impl Collector for RttCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let peers = self.table.snapshot(Instant::now());
        families(&self.descs, &peers, &self.host, self.peer_label)
    }
}

fn millis(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn label(name: &str, value: &str) -> LabelPair {
    let mut pair = LabelPair::default();
    pair.set_name(name.to_owned());
    pair.set_value(value.to_owned());
    pair
}

fn family(desc: &Desc, kind: MetricType, metrics: Vec<Metric>) -> MetricFamily {
    let mut family = MetricFamily::default();
    family.set_name(desc.fq_name.clone());
    family.set_help(desc.help.clone());
    family.set_field_type(kind);
    family.set_metric(metrics);
    family
}

fn gauge(labels: Vec<LabelPair>, value: f64) -> Metric {
    let mut gauge = Gauge::default();
    gauge.set_value(value);
    let mut metric = Metric::from_gauge(gauge);
    metric.set_label(labels);
    metric
}

/// Builds the families for a snapshot of the table. A family without series is left out, as
/// Prometheus clients do.
fn families(
    descs: &[Desc],
    peers: &[(PeerId, RttStats)],
    host: &str,
    peer_label: &str,
) -> Vec<MetricFamily> {
    let labels = |peer: &PeerId| vec![label("host", host), label(peer_label, &peer.to_string())];
    let mut rtt = Vec::new();
    let mut ewma = Vec::new();
    let mut window = Vec::new();
    for (peer, stats) in peers {
        rtt.push(gauge(labels(peer), millis(stats.last)));
        ewma.push(gauge(labels(peer), millis(stats.ewma)));
        if let Some(w) = &stats.window {
            let mut summary = Summary::default();
            summary.set_sample_count(w.samples);
            summary.set_sample_sum(millis(w.sum));
            summary.set_quantile(
                [(0.5, w.p50), (0.9, w.p90), (0.99, w.p99)]
                    .into_iter()
                    .map(|(q, value)| {
                        let mut quantile = Quantile::default();
                        quantile.set_quantile(q);
                        quantile.set_value(millis(value));
                        quantile
                    })
                    .collect(),
            );
            let mut metric = Metric::from_label(labels(peer));
            metric.set_summary(summary);
            window.push(metric);
        }
    }
    let count = vec![gauge(vec![label("host", host)], peers.len() as f64)];
    [
        (0, MetricType::GAUGE, rtt),
        (1, MetricType::GAUGE, ewma),
        (2, MetricType::SUMMARY, window),
        (3, MetricType::GAUGE, count),
    ]
    .into_iter()
    .filter(|(_, _, metrics)| !metrics.is_empty())
    .map(|(index, kind, metrics)| family(&descs[index], kind, metrics))
    .collect()
}

/// One row of the `/peers` JSON view.
#[derive(Debug, serde::Serialize)]
pub struct PeerRow {
    /// The peer's ID.
    pub peer: String,
    /// Whether the peer is connected to this monitor right now.
    pub connected: bool,
    /// The peer's RTT statistics, written into the row itself (`last`, `ewma`, `window`,
    /// `age`; durations in milliseconds).
    #[serde(flatten)]
    pub rtt: RttStats,
}

/// The `/peers` view: every peer in the table, with whether it is connected right now.
#[derive(Debug, serde::Serialize)]
pub struct PeersView {
    /// This monitor's `host` label: --hostname, else the machine's hostname.
    pub host: String,
    /// This monitor's own peer ID.
    pub peer_id: String,
    /// One row per peer in the RTT table, sorted by peer ID.
    pub peers: Vec<PeerRow>,
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use prometheus::{Encoder, Registry, TextEncoder};

    use super::*;
    use crate::rtt::WindowShape;

    #[test]
    fn exports_seed_names_labels_and_summary() {
        let table = Arc::new(RttTable::new(WindowShape::default()));
        let peer = PeerId::random();
        table.record(peer, Duration::from_micros(1500), Instant::now());
        let registry = Registry::new();
        registry
            .register(Box::new(RttCollector::new(
                Arc::clone(&table),
                "edge-1".into(),
                LabelStyle::Seed,
            )))
            .unwrap();
        let mut text = Vec::new();
        TextEncoder::new()
            .encode(&registry.gather(), &mut text)
            .unwrap();
        let text = String::from_utf8(text).unwrap();
        let series = format!("{{host=\"edge-1\",targetHost=\"{peer}\"}}");
        assert!(text.contains(&format!("ping_rtt{series} 1.5")), "{text}");
        assert!(
            text.contains(&format!("ping_ewma_rtt{series} 1.5")),
            "{text}"
        );
        assert!(text.contains("# TYPE ping_rtt_window summary"), "{text}");
        assert!(
            text.contains(&format!("ping_rtt_window_count{series} 1")),
            "{text}"
        );
        assert!(text.contains("ping_peers{host=\"edge-1\"} 1"), "{text}");
    }

    #[test]
    fn expired_peers_leave_the_metrics() {
        let table = Arc::new(RttTable::new(WindowShape::default()));
        let t0 = Instant::now();
        table.record(PeerId::random(), Duration::from_millis(3), t0);
        let collector = RttCollector::new(Arc::clone(&table), "h".into(), LabelStyle::Snake);
        assert_eq!(collector.collect().len(), 4);
        table.expire(t0 + Duration::from_secs(11), Duration::from_secs(10));
        let families = collector.collect();
        assert_eq!(families.len(), 1, "only the peer count is left");
        assert_eq!(families[0].get_metric()[0].get_gauge().get_value(), 0.0);
    }
}
