//! `perf.conf`: the RTT limits instances are chosen against, and every tunable of choosing,
//! probing, ejection, retries, hedging and allocation.
//!
//! TOML, every duration with its unit. `[defaults]` holds any key; `[services.NAME]` overrides
//! any of them for one service except the retry budget's, which is the proxy's:
//!
//! ```toml
//! [defaults]
//! soft-rtt = "20ms"          # instances within this RTT are preferred
//! hard-rtt = "100ms"         # instances over it get no traffic
//! policy = "rtt-histogram"   # or "peak-ewma", "round-robin"
//! probe-interval = "250ms"
//!
//! [services.hello-world-server]
//! soft-rtt = "10ms"
//! ```
//!
//! The root perf.conf lists every key with its unit, default and meaning ([`Tuning`] here).
//! A value out of its range is refused where it is read, so the error names the line and the
//! key; rules between keys (soft-rtt at most hard-rtt, ...) name the section and both keys.
//! Unknown keys are refused so that a typo cannot silently leave a default.
//!
//! The original system's JSON form, `{"SoftReq":{"RTT":20},"HardReq":{"RTT":100}}` with
//! milliseconds, is accepted too (as the defaults).
//!
//! The proxy reads the file again on SIGHUP and when it changes ([`super::live`]).

use std::{collections::BTreeMap, path::Path, time::Duration};

use serde::{Deserialize, Deserializer};

/// How the proxy picks among the instances of a service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Power of two choices on a high RTT quantile and the in-flight count (the default).
    #[default]
    RttHistogram,
    /// Power of two choices on a peak-sensitive EWMA of the RTT, as Finagle and linkerd do.
    PeakEwma,
    /// Every instance in turn, whatever its RTT: the baseline for comparisons.
    RoundRobin,
}

/// RTT limits of one service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `soft-rtt`: instances within this RTT are preferred; with none within it, the proxy
    /// asks an allocator for a nearer instance.
    pub soft_rtt: Duration,
    /// `hard-rtt`: an instance over this RTT gets no traffic; with none under it, the proxy
    /// asks an allocator to start one.
    pub hard_rtt: Duration,
}

/// Built-in defaults, the same as the root perf.conf documents.
pub const DEFAULT_LIMITS: Limits = Limits {
    soft_rtt: Duration::from_millis(20),
    hard_rtt: Duration::from_millis(100),
};

/// How the routing of one service chooses, probes, ejects, times attempts out and asks for
/// instances. Each field is the perf.conf key of the same name in kebab case; the rules they
/// tune are in `crate::select` and `crate::ingress::routing`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tuning {
    /// `policy`: how instances are compared.
    pub policy: Policy,
    /// `rtt-quantile`: the quantile of an instance's RTT window `rtt-histogram` routes on.
    pub rtt_quantile: f64,
    /// `rtt-window`: how far back RTT samples count (kept in four slices): a change of path
    /// is followed within about this.
    pub rtt_window: Duration,
    /// `load-after-rtts`: `rtt-histogram` counts a request in flight as load once it has been
    /// under way this many times its instance's RTT.
    pub load_after_rtts: u32,
    /// `ewma-decay`: time constant of `peak-ewma`'s average.
    pub ewma_decay: Duration,
    /// `probe-interval`: an instance that answered nothing for this long is probed, while
    /// the service is in use.
    pub probe_interval: Duration,
    /// `probe-idle-max`: longest interval between probes of an instance that answers them
    /// but gets no traffic.
    pub probe_idle_max: Duration,
    /// `probe-timeout`: a probe not answered within this failed.
    pub probe_timeout: Duration,
    /// `verify-patience`: longest wait for a new instance's first answer while its
    /// transport answers.
    pub verify_patience: Duration,
    /// `dead-floor`: an instance that answered nothing for the hard limit, at least this,
    /// has its connection checked for silence.
    pub dead_floor: Duration,
    /// `in-use-window`: a service that served no request for this long is quiet: its
    /// instances are not probed, and are verified again before its next request.
    pub in_use_window: Duration,
    /// `discover-interval`: how often the instances of a service in use are looked for again:
    /// an instance someone else started is known within this and a lookup (issue 18 asks
    /// for 2 s). Each time is one Kademlia query, a few round trips to nodes near the key.
    pub discover_interval: Duration,
    /// `discover-retry`: with no instance known, how soon they are looked for again.
    pub discover_retry: Duration,
    /// `eject-after`: consecutive failures that eject an instance.
    pub eject_after: u32,
    /// `first-ejection`: the first ejection's length; each further one doubles...
    pub first_ejection: Duration,
    /// `max-ejection`: ...up to this.
    pub max_ejection: Duration,
    /// `try-factor`: per-try timeout, this many times the p99 of the instance's recent
    /// request times...
    pub try_factor: u32,
    /// `try-floor`: ...at least this; past it an idempotent request is hedged elsewhere.
    pub try_floor: Duration,
    /// `try-unknown`: the per-try timeout before an instance has answered any request.
    pub try_unknown: Duration,
    /// `max-attempts`: how many times one request is tried at most (the first try, retries
    /// and a hedge all count), however much retry budget is left: a request that breaks
    /// every instance it reaches (a "query of death") breaks at most this many.
    pub max_attempts: u32,
    /// `allocation-retry`: after an allocation failed, the next may start this much later.
    pub allocation_retry: Duration,
    /// `nearer-retry`: after an allocation for a nearer instance, the next one may start
    /// this much later.
    pub nearer_retry: Duration,
}

impl Tuning {
    /// The built-in values, the same as the root perf.conf documents.
    pub const DEFAULT: Tuning = Tuning {
        policy: Policy::RttHistogram,
        rtt_quantile: 0.9,
        rtt_window: Duration::from_secs(1),
        load_after_rtts: 2,
        ewma_decay: Duration::from_secs(10),
        probe_interval: Duration::from_millis(250),
        probe_idle_max: Duration::from_secs(4),
        probe_timeout: Duration::from_millis(500),
        verify_patience: Duration::from_secs(2),
        dead_floor: Duration::from_millis(100),
        in_use_window: Duration::from_secs(30),
        discover_interval: Duration::from_secs(1),
        discover_retry: Duration::from_secs(1),
        eject_after: 3,
        first_ejection: Duration::from_secs(1),
        max_ejection: Duration::from_secs(60),
        try_factor: 2,
        try_floor: Duration::from_millis(10),
        try_unknown: Duration::from_secs(1),
        max_attempts: 3,
        allocation_retry: Duration::from_secs(2),
        nearer_retry: Duration::from_secs(30),
    };
}

impl Default for Tuning {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// The proxy-wide retry budget (`crate::retry`): retries and hedges may add about `ratio` of
/// the requests, plus `reserve` at start.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    /// `retry-ratio`, within [0, 1].
    pub ratio: f64,
    /// `retry-reserve`.
    pub reserve: u32,
}

impl Budget {
    /// The built-in budget: retries may add a fifth of the requests, plus 10 at start.
    pub const DEFAULT: Budget = Budget {
        ratio: 0.2,
        reserve: 10,
    };
}

/// What one service is routed with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ServiceSettings {
    /// The RTT limits its instances are chosen against.
    pub limits: Limits,
    /// How its routing chooses, probes, ejects, times attempts out and allocates.
    pub tuning: Tuning,
}

impl Default for ServiceSettings {
    fn default() -> Self {
        Self {
            limits: DEFAULT_LIMITS,
            tuning: Tuning::DEFAULT,
        }
    }
}

/// A parsed perf.conf.
#[derive(Debug, Clone, PartialEq)]
pub struct PerfConfig {
    /// The `[defaults]` section over the built-in values: what a service without a section
    /// of its own is routed with.
    pub defaults: ServiceSettings,
    /// The proxy-wide retry budget, from `retry-ratio` and `retry-reserve` in `[defaults]`.
    pub budget: Budget,
    services: BTreeMap<String, Section>,
}

impl Default for PerfConfig {
    fn default() -> Self {
        Self {
            defaults: ServiceSettings::default(),
            budget: Budget::DEFAULT,
            services: BTreeMap::new(),
        }
    }
}

/// Limits a service's lookup record sets; what it leaves out comes from perf.conf.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Overrides {
    /// The record's soft RTT limit, if it sets one; it wins over perf.conf's `soft-rtt`.
    pub soft_rtt: Option<Duration>,
    /// The record's hard RTT limit, if it sets one; it wins over perf.conf's `hard-rtt`.
    pub hard_rtt: Option<Duration>,
}

/// One section of the file: `[defaults]` or `[services.NAME]`. Field names are the
/// [`Tuning`]'s.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct Section {
    soft_rtt: Option<Span>,
    hard_rtt: Option<Span>,
    policy: Option<Policy>,
    rtt_quantile: Option<Quantile>,
    rtt_window: Option<Period>,
    load_after_rtts: Option<Count>,
    ewma_decay: Option<Period>,
    probe_interval: Option<Period>,
    probe_idle_max: Option<Period>,
    probe_timeout: Option<Period>,
    verify_patience: Option<Period>,
    dead_floor: Option<Period>,
    in_use_window: Option<Period>,
    discover_interval: Option<Period>,
    discover_retry: Option<Period>,
    eject_after: Option<Count>,
    first_ejection: Option<Period>,
    max_ejection: Option<Period>,
    try_factor: Option<Count>,
    try_floor: Option<Period>,
    try_unknown: Option<Period>,
    max_attempts: Option<Count>,
    allocation_retry: Option<Period>,
    nearer_retry: Option<Period>,
    retry_ratio: Option<Quantile>,
    retry_reserve: Option<u32>,
}

impl Section {
    /// `settings` with what this section sets.
    fn over(&self, mut settings: ServiceSettings) -> ServiceSettings {
        macro_rules! set {
            ($($field:ident),*) => {
                $(if let Some(value) = self.$field {
                    settings.tuning.$field = value.into();
                })*
            };
        }
        set!(
            policy,
            rtt_quantile,
            rtt_window,
            load_after_rtts,
            ewma_decay,
            probe_interval,
            probe_idle_max,
            probe_timeout,
            verify_patience,
            dead_floor,
            in_use_window,
            discover_interval,
            discover_retry,
            eject_after,
            first_ejection,
            max_ejection,
            try_factor,
            try_floor,
            try_unknown,
            max_attempts,
            allocation_retry,
            nearer_retry
        );
        if let Some(Span(value)) = self.soft_rtt {
            settings.limits.soft_rtt = value;
        }
        if let Some(Span(value)) = self.hard_rtt {
            settings.limits.hard_rtt = value;
        }
        settings
    }
}

/// Every key a section may hold, as written in the file.
pub const KEYS: &[&str] = &[
    "soft-rtt",
    "hard-rtt",
    "policy",
    "rtt-quantile",
    "rtt-window",
    "load-after-rtts",
    "ewma-decay",
    "probe-interval",
    "probe-idle-max",
    "probe-timeout",
    "verify-patience",
    "dead-floor",
    "in-use-window",
    "discover-interval",
    "discover-retry",
    "eject-after",
    "first-ejection",
    "max-ejection",
    "try-factor",
    "try-floor",
    "try-unknown",
    "max-attempts",
    "allocation-retry",
    "nearer-retry",
    "retry-ratio",
    "retry-reserve",
];

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct TomlFile {
    #[serde(default)]
    defaults: Section,
    #[serde(default)]
    services: BTreeMap<String, Section>,
}

/// The original's `{"SoftReq":{"RTT":ms},"HardReq":{"RTT":ms}}`.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct SeedJson {
    soft_req: SeedRequirement,
    hard_req: SeedRequirement,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SeedRequirement {
    #[serde(rename = "RTT")]
    rtt_ms: u64,
}

/// The original's later `conf.json`: its `Perf` is the seed's perf.conf; its `Bootstraps`
/// are the overlay's business (`mtc_overlay::common::conf_json`), other keys are ignored.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ConfJson {
    perf: SeedJson,
}

/// The limits of the seed's JSON perf.conf, or of a conf.json's `Perf`.
fn seed_json(text: &str) -> Result<SeedJson, InvalidPerf> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| InvalidPerf(format!("JSON form: {e}")))?;
    if value.get("Perf").is_some() || value.get("Bootstraps").is_some() {
        let conf: ConfJson = serde_json::from_value(value)
            .map_err(|e| InvalidPerf(format!("conf.json form: {e}")))?;
        return Ok(conf.perf);
    }
    serde_json::from_value(value).map_err(|e| InvalidPerf(format!("seed JSON form: {e}")))
}

/// A duration as a humantime string ("20ms"); a bare number is refused for lack of a unit.
fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text).map_err(|e| {
        serde::de::Error::custom(format!(
            "'{text}' is not a duration with a unit like \"20ms\": {e}"
        ))
    })
}

/// A duration, zero allowed (the limits).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Span(Duration);

/// A duration above zero.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Period(Duration);

/// A fraction within [0, 1] (a quantile above 0).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Quantile(f64);

/// A whole number of at least 1.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Count(u32);

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        duration(d).map(Self)
    }
}

/// The longest period any key takes: longer is surely a mistake ("forever"), and time
/// arithmetic on it could overflow.
const MAX_PERIOD: Duration = Duration::from_secs(24 * 3600);
/// The largest count any key takes (a failure count, a factor).
const MAX_COUNT: u32 = 1000;

impl<'de> Deserialize<'de> for Period {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match duration(d)? {
            Duration::ZERO => Err(serde::de::Error::custom("must be longer than zero")),
            value if value > MAX_PERIOD => {
                Err(serde::de::Error::custom("must be at most a day (\"24h\")"))
            }
            value => Ok(Self(value)),
        }
    }
}

impl<'de> Deserialize<'de> for Quantile {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = f64::deserialize(d)?;
        if (0.0..=1.0).contains(&value) {
            Ok(Self(value))
        } else {
            Err(serde::de::Error::custom(format!(
                "{value} is not a fraction within 0 and 1"
            )))
        }
    }
}

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match u32::deserialize(d)? {
            0 => Err(serde::de::Error::custom("must be at least 1")),
            value if value > MAX_COUNT => Err(serde::de::Error::custom(format!(
                "{value} is more than {MAX_COUNT}"
            ))),
            value => Ok(Self(value)),
        }
    }
}

impl From<Period> for Duration {
    fn from(value: Period) -> Self {
        value.0
    }
}

impl From<Quantile> for f64 {
    fn from(value: Quantile) -> Self {
        value.0
    }
}

impl From<Count> for u32 {
    fn from(value: Count) -> Self {
        value.0
    }
}

/// Why [`PerfConfig::load`] failed: the file could not be read, or its text was refused.
#[derive(Debug, thiserror::Error)]
pub enum PerfError {
    /// The file could not be read (missing, unreadable, not UTF-8).
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file's path, as given.
        path: String,
        /// The I/O error reading it.
        source: std::io::Error,
    },
    /// The file was read but its text is not a valid perf.conf.
    #[error("{path}: {error}")]
    Invalid {
        /// The file's path, as given.
        path: String,
        /// What is wrong in it: the line and key, or the section and keys.
        error: InvalidPerf,
    },
}

/// Why perf.conf text was refused: where TOML says it, the line and the key; else the
/// section and keys.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidPerf(String);

impl PerfConfig {
    /// Reads and checks a perf.conf (TOML, or the seed's JSON form).
    pub fn load(path: &Path) -> Result<Self, PerfError> {
        let display = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| PerfError::Read {
            path: display.clone(),
            source,
        })?;
        Self::parse(&text).map_err(|error| PerfError::Invalid {
            path: display,
            error,
        })
    }

    /// Parses perf.conf text; the error names the line and key where TOML says them.
    pub fn parse(text: &str) -> Result<Self, InvalidPerf> {
        let config = if text.trim_start().starts_with('{') {
            let seed: SeedJson = seed_json(text)?;
            let mut config = Self::default();
            config.defaults.limits = Limits {
                soft_rtt: Duration::from_millis(seed.soft_req.rtt_ms),
                hard_rtt: Duration::from_millis(seed.hard_req.rtt_ms),
            };
            config
        } else {
            let file: TomlFile = toml::from_str(text)
                .map_err(|e| InvalidPerf(e.to_string().trim_end().to_owned()))?;
            let budget = Budget {
                ratio: file
                    .defaults
                    .retry_ratio
                    .map_or(Budget::DEFAULT.ratio, f64::from),
                reserve: file
                    .defaults
                    .retry_reserve
                    .unwrap_or(Budget::DEFAULT.reserve),
            };
            Self {
                defaults: file.defaults.over(ServiceSettings::default()),
                budget,
                services: file.services,
            }
        };
        config.check()?;
        Ok(config)
    }

    /// The rules between keys, in every section as it applies.
    fn check(&self) -> Result<(), InvalidPerf> {
        let mut all = vec![("defaults".to_owned(), self.defaults)];
        for (name, section) in &self.services {
            let section_name = format!("services.{name}");
            if section.retry_ratio.is_some() || section.retry_reserve.is_some() {
                return Err(InvalidPerf(format!(
                    "[{section_name}]: retry-ratio and retry-reserve are the whole proxy's \
                     budget; set them in [defaults]"
                )));
            }
            all.push((section_name, self.service(name, Overrides::default())));
        }
        for (section, ServiceSettings { limits, tuning }) in all {
            let pairs = [
                ("soft-rtt", limits.soft_rtt, "hard-rtt", limits.hard_rtt),
                (
                    "probe-interval",
                    tuning.probe_interval,
                    "probe-idle-max",
                    tuning.probe_idle_max,
                ),
                (
                    "first-ejection",
                    tuning.first_ejection,
                    "max-ejection",
                    tuning.max_ejection,
                ),
                (
                    "try-floor",
                    tuning.try_floor,
                    "try-unknown",
                    tuning.try_unknown,
                ),
            ];
            for (low_key, low, high_key, high) in pairs {
                if low > high {
                    return Err(InvalidPerf(format!(
                        "[{section}]: {low_key} {low:?} is above {high_key} {high:?}"
                    )));
                }
            }
            if tuning.rtt_quantile == 0.0 {
                return Err(InvalidPerf(format!(
                    "[{section}]: rtt-quantile must be above 0"
                )));
            }
        }
        Ok(())
    }

    /// How `service` is routed: the lookup record's own limits win, then the service's
    /// section of this file, then its defaults.
    pub fn service(&self, service: &str, record: Overrides) -> ServiceSettings {
        let mut settings = match self.services.get(service) {
            Some(section) => section.over(self.defaults),
            None => self.defaults,
        };
        if let Some(soft) = record.soft_rtt {
            settings.limits.soft_rtt = soft;
        }
        if let Some(hard) = record.hard_rtt {
            settings.limits.hard_rtt = hard;
        }
        settings
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_documented_root_perf_conf_parses_to_the_defaults() {
        let text = include_str!("../../../perf.conf");
        let config = PerfConfig::parse(text).unwrap();
        assert_eq!(config, PerfConfig::default());
        // Every key is there, set: the file documents them all.
        let set: Vec<&str> = text
            .lines()
            .filter_map(|line| line.split_once(" = "))
            .map(|(key, _)| key)
            .collect();
        for key in KEYS {
            assert!(set.contains(key), "the root perf.conf does not set {key}");
        }
    }

    #[test]
    fn record_beats_service_section_beats_defaults() {
        let config = PerfConfig::parse(
            "[defaults]\nsoft-rtt = \"30ms\"\nhard-rtt = \"200ms\"\npolicy = \"peak-ewma\"\n\
             [services.api]\nsoft-rtt = \"5ms\"\n",
        )
        .unwrap();
        assert_eq!(config.defaults.tuning.policy, Policy::PeakEwma);
        assert_eq!(
            config.service("other", Overrides::default()).limits,
            Limits {
                soft_rtt: MS * 30,
                hard_rtt: MS * 200
            }
        );
        assert_eq!(
            config.service("api", Overrides::default()).limits,
            Limits {
                soft_rtt: MS * 5,
                hard_rtt: MS * 200
            }
        );
        let record = Overrides {
            soft_rtt: Some(MS * 2),
            hard_rtt: Some(MS * 9),
        };
        assert_eq!(
            config.service("api", record).limits,
            Limits {
                soft_rtt: MS * 2,
                hard_rtt: MS * 9
            }
        );
    }

    #[test]
    fn every_tunable_is_read_and_a_service_section_overrides_any_of_them() {
        let config = PerfConfig::parse(
            "[defaults]\nprobe-interval = \"100ms\"\nrtt-quantile = 0.99\nretry-ratio = 0.1\n\
             retry-reserve = 3\ntry-floor = \"5ms\"\n\
             [services.api]\npolicy = \"round-robin\"\neject-after = 7\nrtt-window = \"2s\"\n",
        )
        .unwrap();
        assert_eq!(
            config.budget,
            Budget {
                ratio: 0.1,
                reserve: 3
            }
        );
        let defaults = config.service("other", Overrides::default()).tuning;
        assert_eq!(
            defaults,
            Tuning {
                probe_interval: MS * 100,
                rtt_quantile: 0.99,
                try_floor: MS * 5,
                ..Tuning::DEFAULT
            }
        );
        let api = config.service("api", Overrides::default()).tuning;
        assert_eq!(
            api,
            Tuning {
                policy: Policy::RoundRobin,
                eject_after: 7,
                rtt_window: MS * 2000,
                ..defaults
            }
        );
    }

    #[test]
    fn the_originals_conf_json_gives_its_perf() {
        let config = PerfConfig::parse(
            r#"{"Perf":{"SoftReq":{"RTT":30},"HardReq":{"RTT":300}},"Bootstraps":["/ip4/1.2.3.4/tcp/4001/p2p/x"]}"#,
        )
        .unwrap();
        assert_eq!(
            config.defaults.limits,
            Limits {
                soft_rtt: MS * 30,
                hard_rtt: MS * 300
            }
        );
        let error = PerfConfig::parse(r#"{"Bootstraps":[]}"#)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("conf.json") && error.contains("Perf"),
            "{error}"
        );
    }

    #[test]
    fn the_seed_json_form_is_milliseconds() {
        let config =
            PerfConfig::parse(r#"{"SoftReq":{"RTT":100},"HardReq":{"RTT":1000}}"#).unwrap();
        assert_eq!(
            config.defaults.limits,
            Limits {
                soft_rtt: MS * 100,
                hard_rtt: MS * 1000
            }
        );
    }

    #[test]
    fn errors_name_line_and_key() {
        let cases = [
            (
                "[defaults]\nsoft-rtt = \"20ms\"\nhard_rtt = \"1s\"\n",
                &["line 3", "hard_rtt"][..],
            ),
            ("[defaults]\nsoft-rtt = 20\n", &["line 2", "soft-rtt"]),
            (
                "[defaults]\n\nsoft-rtt = \"twenty\"\n",
                &["line 3", "twenty"],
            ),
            (
                "[defaults]\nsoft-rtt = \"2s\"\nhard-rtt = \"1s\"\n",
                &["[defaults]", "soft-rtt"],
            ),
            ("[services.x]\nhard-rtt = \"1ms\"\n", &["[services.x]"]),
            ("[defaults]\npolicy = \"random\"\n", &["line 2", "random"]),
            ("{\"SoftReq\":{\"RTT\":\"x\"}}", &["seed JSON"]),
            (
                "[defaults]\nrtt-quantile = 1.5\n",
                &["line 2", "rtt-quantile", "1.5"],
            ),
            (
                "[defaults]\n\nprobe-interval = \"0s\"\n",
                &["line 3", "probe-interval", "zero"],
            ),
            ("[defaults]\neject-after = 0\n", &["line 2", "eject-after"]),
            (
                "[defaults]\nmax-ejection = \"1000y\"\n",
                &["line 2", "max-ejection", "a day"],
            ),
            (
                "[defaults]\neject-after = 4000000000\n",
                &["line 2", "eject-after"],
            ),
            (
                "[services.api]\nprobe-idle-max = \"100ms\"\n",
                &["[services.api]", "probe-interval", "probe-idle-max"],
            ),
            (
                "[services.api]\nretry-ratio = 0.5\n",
                &["[services.api]", "retry-ratio", "[defaults]"],
            ),
        ];
        for (text, needles) in cases {
            let error = PerfConfig::parse(text).unwrap_err().to_string();
            for needle in needles {
                assert!(
                    error.contains(needle),
                    "{text:?}: '{error}' should name {needle}"
                );
            }
        }
    }

    #[test]
    fn load_names_the_file() {
        let error = PerfConfig::load(Path::new("/nonexistent/perf.conf"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("/nonexistent/perf.conf"), "{error}");
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), "bogus = 1\n").unwrap();
        let error = PerfConfig::load(file.path()).unwrap_err().to_string();
        assert!(
            error.contains(&file.path().display().to_string()) && error.contains("bogus"),
            "{error}"
        );
    }
}
