//! Fuzzes the perf.conf parser (`proxy::config::perf::PerfConfig::parse`), TOML or the seed's
//! JSON, with any text (bytes that are not UTF-8 are read lossily): it refuses, or gives a
//! configuration that parses the same again and in which every section (the defaults and each
//! `[services.NAME]`) keeps the rules the parser promises: soft-rtt at most hard-rtt, the
//! pairs of bounds in order, a quantile in (0, 1], periods within (0, 24h], counts within
//! 1..=1000, a retry ratio within [0, 1]; a service without a section gets the defaults, and
//! a lookup record's limits win.

#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use proxy::config::perf::{Overrides, PerfConfig, ServiceSettings};

const DAY: Duration = Duration::from_secs(24 * 3600);

fn check(section: &str, settings: &ServiceSettings) {
    let (limits, tuning) = (settings.limits, settings.tuning);
    assert!(
        limits.soft_rtt <= limits.hard_rtt,
        "[{section}] soft over hard"
    );
    assert!(
        tuning.probe_interval <= tuning.probe_idle_max,
        "[{section}]"
    );
    assert!(tuning.first_ejection <= tuning.max_ejection, "[{section}]");
    assert!(tuning.try_floor <= tuning.try_unknown, "[{section}]");
    assert!(
        tuning.rtt_quantile > 0.0 && tuning.rtt_quantile <= 1.0,
        "[{section}] quantile {}",
        tuning.rtt_quantile
    );
    for period in [
        tuning.rtt_window,
        tuning.ewma_decay,
        tuning.probe_interval,
        tuning.probe_idle_max,
        tuning.probe_timeout,
        tuning.verify_patience,
        tuning.dead_floor,
        tuning.in_use_window,
        tuning.discover_interval,
        tuning.discover_retry,
        tuning.first_ejection,
        tuning.max_ejection,
        tuning.try_floor,
        tuning.try_unknown,
        tuning.allocation_retry,
        tuning.nearer_retry,
    ] {
        assert!(
            period > Duration::ZERO && period <= DAY,
            "[{section}] period {period:?}"
        );
    }
    for count in [
        tuning.load_after_rtts,
        tuning.eject_after,
        tuning.try_factor,
        tuning.max_attempts,
    ] {
        assert!((1..=1000).contains(&count), "[{section}] count {count}");
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Ok(config) = PerfConfig::parse(&text) else {
        return;
    };
    assert_eq!(
        PerfConfig::parse(&text).as_ref(),
        Ok(&config),
        "parsed differently twice"
    );
    check("defaults", &config.defaults);
    assert!((0.0..=1.0).contains(&config.budget.ratio), "retry ratio");

    // The sections the text names (TOML only; the JSON form has none).
    let mut names = Vec::new();
    if !text.trim_start().starts_with('{') {
        let table: toml::Table = text.parse().expect("accepted TOML parses as a table");
        if let Some(services) = table.get("services").and_then(|s| s.as_table()) {
            names.extend(services.keys().cloned());
        }
    }
    for name in &names {
        check(
            &format!("services.{name}"),
            &config.service(name, Overrides::default()),
        );
    }
    let unnamed = (0..)
        .map(|i| format!("unnamed-{i}"))
        .find(|name| !names.contains(name))
        .expect("a free name");
    assert_eq!(
        config.service(&unnamed, Overrides::default()),
        config.defaults
    );

    // A lookup record's limits win over any section.
    let record = Overrides {
        soft_rtt: Some(Duration::from_millis(3)),
        hard_rtt: Some(Duration::from_millis(4)),
    };
    for name in names.iter().chain([&unnamed]) {
        let settings = config.service(name, record);
        assert_eq!(settings.limits.soft_rtt, Duration::from_millis(3));
        assert_eq!(settings.limits.hard_rtt, Duration::from_millis(4));
    }
});
