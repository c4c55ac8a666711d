//! Round-trip times: a sliding window per peer (its samples while few, HDR histograms once
//! many) plus the last sample and an EWMA.
//!
//! Pure bookkeeping: every method takes the current `Instant`, so tests drive time by hand. The
//! overlay feeds it libp2p ping results; the ping-monitor exports it; the proxy will choose
//! instances from it.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use libp2p::PeerId;

/// Lowest and highest RTT the histograms resolve, in microseconds. Slower samples are clamped
/// to the top: anything over a minute is "unreachable" for routing purposes anyway.
const LOWEST_MICROS: u64 = 1;
const HIGHEST_MICROS: u64 = 60_000_000;
/// Two significant digits: 1% resolution, a quarter of the memory of three digits.
const SIGNIFICANT_DIGITS: u8 = 2;
/// Weight of a new sample in the EWMA; libp2p's peer store (and so the seed) used 0.1.
const EWMA_ALPHA: f64 = 0.1;

/// How much history a window keeps: `slices` histograms of `slice` each; the oldest one is
/// dropped as a new one starts, so the window covers between `(slices - 1) * slice` and
/// `slices * slice` of the past.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowShape {
    /// How many histograms the window is split into (a window has at least one).
    pub slices: usize,
    /// How long each histogram collects samples before the next one starts (at least 1 ms).
    pub slice: Duration,
}

impl Default for WindowShape {
    /// One minute in four slices of 15 s.
    fn default() -> Self {
        Self {
            slices: 4,
            slice: Duration::from_secs(15),
        }
    }
}

/// Samples a slice keeps as they are before it turns them into a histogram. A histogram of
/// these bounds is 10 KiB, whatever it holds; a peer pinged every second puts 15 samples in a
/// 15 s slice (60 bytes). Kept as samples, the windows of the ping-monitor's thousand members,
/// and of every peer an idle proxy met while the network formed, cost next to nothing; a
/// window fed by requests (the ingress's) turns into histograms in its first busy slice and
/// stays so.
const RAW_SAMPLES: usize = 64;

/// One slice's samples: as recorded while few, a histogram past [`RAW_SAMPLES`].
#[derive(Debug, Clone)]
enum Slice {
    Samples(Vec<u32>),
    Histogram(Box<Histogram<u32>>),
}

impl Slice {
    fn record(&mut self, micros: u64) {
        match self {
            Slice::Samples(samples) if samples.len() < RAW_SAMPLES => {
                samples.push(u32::try_from(micros).unwrap_or(u32::MAX));
            }
            Slice::Samples(samples) => {
                let mut histogram = Box::new(empty_histogram());
                for &sample in samples.iter() {
                    histogram.saturating_record(u64::from(sample));
                }
                histogram.saturating_record(micros);
                *self = Slice::Histogram(histogram);
            }
            Slice::Histogram(histogram) => histogram.saturating_record(micros),
        }
    }

    /// Empties it, keeping its form: a busy window does not allocate again each slice.
    fn reset(&mut self) {
        match self {
            Slice::Samples(samples) => samples.clear(),
            Slice::Histogram(histogram) => histogram.reset(),
        }
    }
}

/// RTT samples of the recent past.
#[derive(Debug, Clone)]
pub struct RttWindow {
    slices: Vec<Slice>,
    slice_len: Duration,
    current: usize,
    current_start: Instant,
}

fn empty_histogram() -> Histogram<u32> {
    Histogram::new_with_bounds(LOWEST_MICROS, HIGHEST_MICROS, SIGNIFICANT_DIGITS)
        .expect("constant histogram bounds are valid")
}

/// A window's samples, merged: sorted as they are while every slice holds few, else one
/// histogram.
enum Merged {
    Sorted(Vec<u32>),
    Histogram(Histogram<u32>),
}

impl Merged {
    fn len(&self) -> u64 {
        match self {
            Merged::Sorted(samples) => samples.len() as u64,
            Merged::Histogram(histogram) => histogram.len(),
        }
    }

    /// The sample at `quantile` (0.0 to 1.0): the smallest with at least that share of the
    /// samples at or below it, as the histogram's `value_at_quantile` reads it.
    fn at(&self, quantile: f64) -> Duration {
        let micros = match self {
            Merged::Sorted(samples) => {
                let rank = (quantile * samples.len() as f64).ceil() as usize;
                u64::from(samples[rank.clamp(1, samples.len()) - 1])
            }
            Merged::Histogram(histogram) => histogram.value_at_quantile(quantile),
        };
        Duration::from_micros(micros)
    }

    fn min(&self) -> Duration {
        match self {
            Merged::Sorted(_) => self.at(0.0),
            Merged::Histogram(histogram) => Duration::from_micros(histogram.min()),
        }
    }

    fn max(&self) -> Duration {
        match self {
            Merged::Sorted(_) => self.at(1.0),
            Merged::Histogram(histogram) => Duration::from_micros(histogram.max()),
        }
    }

    fn sum(&self) -> Duration {
        match self {
            Merged::Sorted(samples) => {
                Duration::from_micros(samples.iter().map(|&s| u64::from(s)).sum())
            }
            Merged::Histogram(histogram) => {
                Duration::from_secs_f64(histogram.mean() * histogram.len() as f64 / 1e6)
            }
        }
    }
}

impl RttWindow {
    /// An empty window of `shape` whose first slice starts at `now`.
    pub fn new(shape: WindowShape, now: Instant) -> Self {
        let slices = shape.slices.max(1);
        Self {
            slices: (0..slices).map(|_| Slice::Samples(Vec::new())).collect(),
            slice_len: shape.slice.max(Duration::from_millis(1)),
            current: 0,
            current_start: now,
        }
    }

    /// Adds one sample taken at `now`.
    pub fn record(&mut self, now: Instant, rtt: Duration) {
        self.advance(now);
        let micros = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX);
        self.slices[self.current].record(micros.clamp(LOWEST_MICROS, HIGHEST_MICROS));
    }

    /// Starts new slices for the time passed since the current one began, dropping the oldest.
    fn advance(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.current_start);
        let passed = (elapsed.as_nanos() / self.slice_len.as_nanos()) as u64;
        if passed == 0 {
            return;
        }
        for _ in 0..passed.min(self.slices.len() as u64) {
            self.current = (self.current + 1) % self.slices.len();
            self.slices[self.current].reset();
        }
        self.current_start += self.slice_len * u32::try_from(passed).unwrap_or(u32::MAX);
    }

    /// The samples still inside the window at `now`, merged; `None` if there are none.
    fn merged(&mut self, now: Instant) -> Option<Merged> {
        self.advance(now);
        let merged = if self.slices.iter().all(|s| matches!(s, Slice::Samples(_))) {
            let mut all = Vec::new();
            for slice in &self.slices {
                if let Slice::Samples(samples) = slice {
                    all.extend_from_slice(samples);
                }
            }
            all.sort_unstable();
            Merged::Sorted(all)
        } else {
            let mut merged = empty_histogram();
            for slice in &self.slices {
                match slice {
                    Slice::Samples(samples) => {
                        for &sample in samples {
                            merged.saturating_record(u64::from(sample));
                        }
                    }
                    Slice::Histogram(histogram) => merged
                        .add(&**histogram)
                        .expect("histograms with equal bounds always merge"),
                }
            }
            Merged::Histogram(merged)
        };
        (merged.len() > 0).then_some(merged)
    }

    /// One quantile (0.0 to 1.0) of the samples inside the window at `now`.
    pub fn quantile(&mut self, now: Instant, quantile: f64) -> Option<Duration> {
        Some(self.merged(now)?.at(quantile))
    }

    /// Quantiles of the samples still inside the window at `now`, or `None` if there are none.
    pub fn summary(&mut self, now: Instant) -> Option<WindowSummary> {
        let merged = self.merged(now)?;
        Some(WindowSummary {
            samples: merged.len(),
            min: merged.min(),
            p50: merged.at(0.5),
            p90: merged.at(0.9),
            p99: merged.at(0.99),
            max: merged.max(),
            sum: merged.sum(),
        })
    }
}

/// Quantiles of a window's samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct WindowSummary {
    /// How many samples are in the window.
    pub samples: u64,
    /// The smallest sample (fractional milliseconds in JSON, as every duration here).
    #[serde(with = "millis")]
    pub min: Duration,
    /// The median.
    #[serde(with = "millis")]
    pub p50: Duration,
    /// The 90th percentile.
    #[serde(with = "millis")]
    pub p90: Duration,
    /// The 99th percentile.
    #[serde(with = "millis")]
    pub p99: Duration,
    /// The largest sample.
    #[serde(with = "millis")]
    pub max: Duration,
    /// The sum of the samples (for Prometheus summaries): exact while the window holds few
    /// samples, else mean times count at the histogram's resolution of about 1%, like the
    /// quantiles.
    #[serde(with = "millis")]
    pub sum: Duration,
}

/// What is known about the RTT to one peer.
#[derive(Debug, Clone)]
struct PeerRtt {
    window: RttWindow,
    last: Duration,
    ewma_secs: f64,
    last_seen: Instant,
}

/// A consistent view of one peer's RTT.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RttStats {
    /// The latest sample.
    #[serde(with = "millis")]
    pub last: Duration,
    /// Exponentially weighted moving average (alpha 0.1) of all samples.
    #[serde(with = "millis")]
    pub ewma: Duration,
    /// The samples of the sliding window, if any are still inside it.
    pub window: Option<WindowSummary>,
    /// How long ago the latest sample was taken.
    #[serde(with = "millis")]
    pub age: Duration,
}

/// RTTs to every peer a node has measured, shared between the overlay (which records) and
/// readers (metrics, routing). One short lock per sample or read: pings arrive once a second
/// per peer, far from any request path.
#[derive(Debug, Default)]
pub struct RttTable {
    shape: WindowShape,
    peers: Mutex<HashMap<PeerId, PeerRtt>>,
}

impl RttTable {
    /// An empty table; each peer measured gets a window of `shape`.
    pub fn new(shape: WindowShape) -> Self {
        Self {
            shape,
            peers: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, PeerRtt>> {
        // A panic elsewhere while holding the lock leaves plain numbers behind: keep going.
        self.peers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records a sample for `peer` taken at `now`.
    pub fn record(&self, peer: PeerId, rtt: Duration, now: Instant) {
        let mut peers = self.lock();
        let entry = peers.entry(peer).or_insert_with(|| PeerRtt {
            window: RttWindow::new(self.shape, now),
            last: rtt,
            ewma_secs: rtt.as_secs_f64(),
            last_seen: now,
        });
        entry.window.record(now, rtt);
        entry.last = rtt;
        entry.ewma_secs = EWMA_ALPHA * rtt.as_secs_f64() + (1.0 - EWMA_ALPHA) * entry.ewma_secs;
        entry.last_seen = now;
    }

    /// The RTT statistics of one peer, if it was ever measured (and not expired).
    pub fn get(&self, peer: &PeerId, now: Instant) -> Option<RttStats> {
        self.lock().get_mut(peer).map(|entry| stats(entry, now))
    }

    /// Statistics of every peer, sorted by peer ID for stable output.
    pub fn snapshot(&self, now: Instant) -> Vec<(PeerId, RttStats)> {
        let mut all: Vec<_> = self
            .lock()
            .iter_mut()
            .map(|(peer, entry)| (*peer, stats(entry, now)))
            .collect();
        all.sort_by_key(|(peer, _)| *peer);
        all
    }

    /// Forgets peers with no sample for longer than `max_age`; returns them.
    pub fn expire(&self, now: Instant, max_age: Duration) -> Vec<PeerId> {
        let mut expired = Vec::new();
        self.lock().retain(|peer, entry| {
            let keep = now.saturating_duration_since(entry.last_seen) <= max_age;
            if !keep {
                expired.push(*peer);
            }
            keep
        });
        expired
    }

    /// How many peers the table holds.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether the table holds no peer.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn stats(entry: &mut PeerRtt, now: Instant) -> RttStats {
    RttStats {
        last: entry.last,
        ewma: Duration::from_secs_f64(entry.ewma_secs),
        window: entry.window.summary(now),
        age: now.saturating_duration_since(entry.last_seen),
    }
}

/// Durations in JSON as fractional milliseconds, the unit people read RTTs in.
mod millis {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64() * 1e3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn shape() -> WindowShape {
        WindowShape {
            slices: 3,
            slice: Duration::from_secs(10),
        }
    }

    #[test]
    fn quantiles_of_recorded_samples() {
        let t0 = Instant::now();
        let mut window = RttWindow::new(shape(), t0);
        assert!(window.summary(t0).is_none());
        for i in 1..=100 {
            window.record(t0, MS * i);
        }
        let s = window.summary(t0).unwrap();
        assert_eq!(s.samples, 100);
        let close = |d: Duration, ms: f64| (d.as_secs_f64() * 1e3 - ms).abs() / ms < 0.02;
        assert!(close(s.p50, 50.0), "{s:?}");
        assert!(close(s.p99, 99.0), "{s:?}");
        assert!(close(s.max, 100.0), "{s:?}");
        assert!(close(s.min, 1.0), "{s:?}");
    }

    #[test]
    fn few_samples_are_kept_as_they_are_and_read_exactly() {
        let t0 = Instant::now();
        let mut window = RttWindow::new(shape(), t0);
        for ms in [30, 10, 20, 40] {
            window.record(t0, MS * ms);
        }
        assert!(window.slices.iter().all(|s| matches!(s, Slice::Samples(_))));
        let s = window.summary(t0).unwrap();
        assert_eq!(
            (s.samples, s.min, s.max, s.sum),
            (4, MS * 10, MS * 40, MS * 100)
        );
        assert_eq!((s.p50, s.p90, s.p99), (MS * 20, MS * 40, MS * 40));
        assert_eq!(window.quantile(t0, 0.75), Some(MS * 30));
    }

    #[test]
    fn a_busy_slice_turns_into_a_histogram_and_reads_the_same() {
        let t0 = Instant::now();
        let mut window = RttWindow::new(shape(), t0);
        // A few samples in the first slice, many in the second.
        for i in 1..=10 {
            window.record(t0, MS * i);
        }
        let t1 = t0 + Duration::from_secs(10);
        for i in 11..=200 {
            window.record(t1, MS * i);
        }
        assert!(matches!(window.slices[0], Slice::Samples(_)));
        assert!(matches!(window.slices[1], Slice::Histogram(_)));
        let s = window.summary(t1).unwrap();
        assert_eq!(s.samples, 200);
        let close = |d: Duration, ms: f64| (d.as_secs_f64() * 1e3 - ms).abs() / ms < 0.02;
        assert!(
            close(s.p50, 100.0) && close(s.p99, 198.0) && close(s.min, 1.0),
            "{s:?}"
        );
        // Emptied as the window moves on, it stays a histogram (no allocation per slice).
        assert!(window.summary(t1 + Duration::from_secs(40)).is_none());
        assert!(matches!(window.slices[1], Slice::Histogram(_)));
    }

    #[test]
    fn old_samples_leave_the_window() {
        let t0 = Instant::now();
        let mut window = RttWindow::new(shape(), t0);
        window.record(t0, MS * 100);
        // Still inside two slices later.
        window.record(t0 + Duration::from_secs(25), MS);
        assert_eq!(
            window
                .summary(t0 + Duration::from_secs(25))
                .unwrap()
                .samples,
            2
        );
        // Three slices after the first sample it has gone; the newer one stays.
        let s = window.summary(t0 + Duration::from_secs(31)).unwrap();
        assert_eq!(s.samples, 1);
        assert!(s.max < MS * 2);
        // A long silence empties the window completely.
        assert!(window.summary(t0 + Duration::from_secs(3600)).is_none());
    }

    #[test]
    fn out_of_range_samples_are_clamped_not_lost() {
        let t0 = Instant::now();
        let mut window = RttWindow::new(shape(), t0);
        window.record(t0, Duration::ZERO);
        window.record(t0, Duration::from_secs(3600));
        let s = window.summary(t0).unwrap();
        assert_eq!(s.samples, 2);
        assert!(s.max >= Duration::from_secs(59));
    }

    #[test]
    fn table_tracks_last_ewma_and_expiry() {
        let t0 = Instant::now();
        let table = RttTable::new(shape());
        let (a, b) = (PeerId::random(), PeerId::random());
        table.record(a, MS * 10, t0);
        table.record(a, MS * 20, t0 + Duration::from_secs(1));
        table.record(b, MS * 5, t0 + Duration::from_secs(5));
        let stats = table.get(&a, t0 + Duration::from_secs(1)).unwrap();
        assert_eq!(stats.last, MS * 20);
        // 0.1 * 20 + 0.9 * 10 = 11 ms
        assert!((stats.ewma.as_secs_f64() * 1e3 - 11.0).abs() < 1e-6);
        assert_eq!(table.snapshot(t0).len(), 2);
        let expired = table.expire(t0 + Duration::from_secs(4), Duration::from_secs(2));
        assert_eq!(expired, vec![a]);
        assert!(table.get(&a, t0).is_none());
        assert_eq!(table.len(), 1);
    }
}
