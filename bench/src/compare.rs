//! Where ours stands against the other paths on one figure, in words: the report says by how
//! much ours is behind wherever it is.

use crate::report::{Report, outln};

/// Which way a figure is better.
#[derive(Clone, Copy)]
pub enum Better {
    Lower,
    Higher,
}

/// One line on `figure`: ours, and for each other path whether ours is behind or ahead of it
/// and by how much. `values` holds `("ours", v)` and the others; without ours, nothing.
pub fn verdict(figure: &str, unit: &str, better: Better, values: &[(&str, f64)]) -> Option<String> {
    let &(_, ours) = values.iter().find(|(name, _)| *name == "ours")?;
    let others: Vec<String> = values
        .iter()
        .filter(|(name, _)| *name != "ours")
        .map(|&(name, theirs)| {
            let behind_by = match better {
                Better::Lower => ours - theirs,
                Better::Higher => theirs - ours,
            };
            let relative = if theirs != 0.0 {
                format!(", {:.0} %", behind_by.abs() / theirs.abs() * 100.0)
            } else {
                String::new()
            };
            let standing = if behind_by > 0.0 {
                "**behind**"
            } else if behind_by < 0.0 {
                "ahead of"
            } else {
                "level with"
            };
            format!(
                "{standing} {name} ({theirs:.3} {unit}) by {:.3} {unit}{relative}",
                behind_by.abs()
            )
        })
        .collect();
    Some(format!(
        "- {figure}: ours {ours:.3} {unit}; {}",
        others.join("; ")
    ))
}

/// Writes the [`verdict`] line, if there is one.
pub fn compare(out: &mut Report, figure: &str, unit: &str, better: Better, values: &[(&str, f64)]) {
    if let Some(line) = verdict(figure, unit, better, values) {
        outln!(out, "{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn says_behind_or_ahead_and_by_how_much() {
        let line = verdict(
            "added p99",
            "ms",
            Better::Lower,
            &[("ours", 0.3), ("nginx", 0.1), ("haproxy", 0.4)],
        )
        .unwrap();
        assert!(
            line.contains("**behind** nginx (0.100 ms) by 0.200 ms, 200 %"),
            "{line}"
        );
        assert!(
            line.contains("ahead of haproxy (0.400 ms) by 0.100 ms, 25 %"),
            "{line}"
        );

        let line = verdict(
            "req/s",
            "req/s",
            Better::Higher,
            &[("ours", 20.0), ("nginx", 25.0)],
        )
        .unwrap();
        assert!(
            line.contains("**behind** nginx (25.000 req/s) by 5.000 req/s, 20 %"),
            "{line}"
        );
        assert_eq!(verdict("x", "ms", Better::Lower, &[("nginx", 1.0)]), None);
    }
}
