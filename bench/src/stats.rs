//! Percentiles of a handful of measured durations.

use std::time::Duration;

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

/// Prints a Markdown table of latency percentiles (in ms), one row per measure.
pub fn print_percentiles(
    first_column: &str,
    percentiles: &[f64],
    rows: &mut [(&str, &mut Vec<Duration>)],
) {
    let header: Vec<String> = percentiles
        .iter()
        .map(|&p| {
            if p >= 100.0 {
                "max ms".to_owned()
            } else {
                format!("p{p} ms")
            }
        })
        .collect();
    println!("| {first_column} | {} |", header.join(" | "));
    println!("|---|{}", "---|".repeat(percentiles.len()));
    for (name, samples) in rows.iter_mut() {
        let cells: Vec<String> = percentiles
            .iter()
            .map(|&p| ms(percentile(samples, p)))
            .collect();
        println!("| {name} | {} |", cells.join(" | "));
    }
    println!();
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
