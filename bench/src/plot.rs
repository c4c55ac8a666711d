//! SVG charts of latency percentile curves: the classic HDR-histogram "percentile
//! distribution" plot, latency (ms) against percentile, one line per measured setup.
//!
//! The x axis is `log10(1 / (1 - p))`, so 90%, 99%, 99.9%... are equally spaced: on a linear
//! percentile axis the whole tail, which is what differs between setups and what users feel,
//! would be squeezed into the last pixel. Each curve stops at the highest percentile its
//! sample count resolves (1 - 1/count), where it shows the maximum.

use std::ops::Range;
use std::path::Path;

use anyhow::Context;
use hdrhistogram::Histogram;
use plotters::coord::ranged1d::{KeyPointHint, NoDefaultFormatting, ValueFormatter};
use plotters::prelude::*;

/// One curve: a label for the legend and latencies recorded in MICROSECONDS.
pub struct Curve<'a> {
    pub label: &'a str,
    pub latency_us: &'a Histogram<u64>,
}

/// Points per curve.
const POINTS: usize = 200;
/// Okabe-Ito colours, distinct for colour-blind readers too.
const COLOURS: [RGBColor; 6] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
];

/// Writes `path` (an .svg): latency (ms, y axis, linear) against percentile on a log scale of
/// 1/(1-p) (x ticks 0%, 90%, 99%, 99.9%... as far as the data reaches), one line per curve
/// (empty histograms are skipped), a legend, `title` on top. One outlier far above the rest
/// (a stall) is cut at the top of the chart, and the y label says "clipped".
pub fn percentile_curves(path: &Path, title: &str, curves: &[Curve<'_>]) -> anyhow::Result<()> {
    let curves: Vec<&Curve> = curves.iter().filter(|c| !c.latency_us.is_empty()).collect();
    let lines: Vec<Vec<(f64, f64)>> = curves.iter().map(|c| points(c.latency_us)).collect();
    let decades = lines
        .iter()
        .filter_map(|l| l.last())
        .map(|&(x, _)| x.ceil() as u32)
        .fold(1, u32::max);

    let histograms: Vec<_> = curves.iter().map(|c| c.latency_us).collect();
    let (top, clipped) = y_top(&histograms);
    let top = (top * 1.1).max(0.001);

    let mut svg = String::new();
    let failed = |e: &dyn std::fmt::Display| anyhow::anyhow!("drawing {}: {e}", path.display());
    {
        let root = SVGBackend::with_string(&mut svg, (900, 560)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| failed(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .margin_right(40)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(Nines(decades), 0.0..top)
            .map_err(|e| failed(&e))?;
        chart
            .configure_mesh()
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 15))
            .x_desc("percentile")
            .y_desc(if clipped {
                "latency (ms, clipped)"
            } else {
                "latency (ms)"
            })
            .draw()
            .map_err(|e| failed(&e))?;
        for (i, (curve, line)) in curves.iter().zip(lines).enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            // plotters does not clip: a clipped curve runs along the top edge.
            let line = line.into_iter().map(|(x, y)| (x, y.min(top)));
            chart
                .draw_series(LineSeries::new(line, colour.stroke_width(2)))
                .map_err(|e| failed(&e))?
                .label(curve.label)
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], colour.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font(("sans-serif", 14))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| failed(&e))?;
        root.present().map_err(|e| failed(&e))?;
    }

    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))
}

/// Top of the y axis (ms) and whether it clips: the highest maximum, unless that is over 20×
/// the other curves' p99 (one stall would flatten every other curve); then the highest p99.99
/// or maximum of the other curves.
fn y_top(histograms: &[&Histogram<u64>]) -> (f64, bool) {
    let highest = |f: &dyn Fn(&Histogram<u64>) -> u64, skip: Option<usize>| {
        (histograms.iter().enumerate())
            .filter(|&(i, _)| Some(i) != skip)
            .map(|(_, h)| f(h) as f64 / 1e3)
            .fold(0.0, f64::max)
    };
    let Some(worst) = (0..histograms.len()).max_by_key(|&i| histograms[i].max()) else {
        return (0.0, false);
    };
    let max = histograms[worst].max() as f64 / 1e3;
    // A single curve is compared with its own p99.
    let others = (histograms.len() > 1).then_some(worst);
    if max <= 20.0 * highest(&|h| h.value_at_quantile(0.99), others) {
        return (max, false);
    }
    let p9999 = highest(&|h| h.value_at_quantile(0.9999), None);
    (p9999.max(highest(&Histogram::max, Some(worst))), true)
}

/// (x, latency ms) at `POINTS` evenly spaced x = log10(1/(1-p)) from p = 0 to 1 - 1/count,
/// the last point being the maximum.
fn points(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    let end = (h.len() as f64).log10().max(1.0);
    (0..POINTS)
        .map(|i| {
            let x = end * i as f64 / (POINTS - 1) as f64;
            let us = if i == POINTS - 1 {
                h.max()
            } else {
                h.value_at_quantile(1.0 - 10f64.powf(-x))
            };
            (x, us as f64 / 1e3)
        })
        .collect()
}

/// X axis from 0 to `self.0` decades of 1/(1-p), with a tick (90%, 99%...) at each decade.
struct Nines(u32);

impl Ranged for Nines {
    type FormatOption = NoDefaultFormatting;
    type ValueType = f64;

    fn map(&self, x: &f64, (from, to): (i32, i32)) -> i32 {
        from + (x / f64::from(self.0) * f64::from(to - from)).round() as i32
    }

    fn key_points<H: KeyPointHint>(&self, _: H) -> Vec<f64> {
        (0..=self.0).map(f64::from).collect()
    }

    fn range(&self) -> Range<f64> {
        0.0..f64::from(self.0)
    }
}

impl ValueFormatter<f64> for Nines {
    /// 0 -> "0%", 1 -> "90%", 2 -> "99%", 3 -> "99.9%"...
    fn format_ext(&self, x: &f64) -> String {
        let decimals = (x.round() as usize).saturating_sub(2);
        format!("{:.*}%", decimals, 100.0 - 10f64.powf(2.0 - x))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 100..2000 µs, with a tail up to `tail_us`.
    fn histogram(tail_us: u64) -> Histogram<u64> {
        let mut h = Histogram::new(3).unwrap();
        for i in 0..10_000u64 {
            h.record(100 + i * 1900 / 10_000).unwrap();
        }
        for i in 1..=10 {
            h.record(tail_us * i / 10).unwrap();
        }
        h
    }

    #[test]
    fn writes_an_svg_with_labels_and_ticks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/latency.svg");
        let (a, b, empty) = (
            histogram(5_000),
            histogram(30_000),
            Histogram::new(3).unwrap(),
        );
        let curves = [
            Curve {
                label: "direct",
                latency_us: &a,
            },
            Curve {
                label: "via proxy",
                latency_us: &b,
            },
            Curve {
                label: "nothing",
                latency_us: &empty,
            },
        ];
        percentile_curves(&path, "GET /hello", &curves).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..100]);
        for text in [
            "GET /hello",
            "direct",
            "via proxy",
            "99%",
            "99.9%",
            "latency (ms)",
        ] {
            assert!(svg.contains(text), "no {text:?} in the SVG");
        }
        assert!(!svg.contains("nothing"), "an empty histogram is drawn");
    }

    #[test]
    fn clips_an_outlier() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clipped.svg");
        let (a, mut b) = (histogram(3_000), histogram(3_000));
        b.record(2_000_000).unwrap(); // one 2 s stall
        let curves = [
            Curve {
                label: "a",
                latency_us: &a,
            },
            Curve {
                label: "b",
                latency_us: &b,
            },
        ];
        percentile_curves(&path, "outlier", &curves).unwrap();
        assert!(
            std::fs::read_to_string(&path)
                .unwrap()
                .contains("(ms, clipped)")
        );
    }

    #[test]
    fn tick_labels() {
        let labels: Vec<_> = (0..=5)
            .map(|x| Nines(5).format_ext(&f64::from(x)))
            .collect();
        assert_eq!(labels, ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"]);
    }
}
