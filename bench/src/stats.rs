//! Percentiles of measured durations (a handful of samples, or an HDR histogram) and the
//! Markdown tables they are printed as.

use std::time::Duration;

use hdrhistogram::Histogram;

use crate::report::{Report, outln};

/// Nearest-rank percentile of `samples` (sorted in place); zero for no samples.
pub fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.sort_unstable();
    let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1]
}

pub fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

/// Milliseconds with two decimals, for sub-millisecond latencies.
pub fn ms2(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

/// Throughput of `bytes` moved in `took`.
pub fn mib_per_s(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / took.as_secs_f64()
}

/// Prints a Markdown table of latency percentiles (in ms), one row per measure.
pub fn print_percentiles(
    out: &mut Report,
    first_column: &str,
    percentiles: &[f64],
    rows: &mut [(&str, &mut Vec<Duration>)],
) {
    let cells: Vec<(&str, Vec<String>)> = rows
        .iter_mut()
        .map(|(name, samples)| {
            let cells = percentiles
                .iter()
                .map(|&p| ms(percentile(samples, p)))
                .collect();
            (*name, cells)
        })
        .collect();
    print_table(out, first_column, percentiles, &cells);
}

/// Values of a histogram recorded in microseconds at each percentile (100 is the maximum).
pub fn histogram_percentiles(histogram: &Histogram<u64>, percentiles: &[f64]) -> Vec<Duration> {
    percentiles
        .iter()
        .map(|&p| Duration::from_micros(histogram.value_at_percentile(p)))
        .collect()
}

/// Prints a Markdown table with one column per percentile (in ms; 0 is the minimum, 100 the
/// maximum) and already formatted cells.
pub fn print_table(
    out: &mut Report,
    first_column: &str,
    percentiles: &[f64],
    rows: &[(&str, Vec<String>)],
) {
    let header: Vec<String> = percentiles
        .iter()
        .map(|&p| {
            if p >= 100.0 {
                "max ms".to_owned()
            } else if p <= 0.0 {
                "min ms".to_owned()
            } else {
                format!("p{p} ms")
            }
        })
        .collect();
    outln!(out, "| {first_column} | {} |", header.join(" | "));
    outln!(out, "|---|{}", "---|".repeat(percentiles.len()));
    for (name, cells) in rows {
        outln!(out, "| {name} | {} |", cells.join(" | "));
    }
    outln!(out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let mut v: Vec<_> = (1..=10).rev().map(Duration::from_millis).collect();
        assert_eq!(percentile(&mut v, 50.0), Duration::from_millis(5));
        assert_eq!(percentile(&mut v, 99.0), Duration::from_millis(10));
        assert_eq!(percentile(&mut v, 0.0), Duration::from_millis(1));
        assert_eq!(percentile(&mut [], 50.0), Duration::ZERO);
    }
}
