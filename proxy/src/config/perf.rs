//! `perf.conf`: the RTT limits instances are chosen against and the choice policy.
//!
//! TOML, every duration with its unit:
//!
//! ```toml
//! [defaults]
//! soft-rtt = "20ms"          # instances within this RTT are preferred
//! hard-rtt = "100ms"         # instances over it get no traffic
//! policy = "rtt-histogram"   # or "peak-ewma", "round-robin"
//!
//! [services.hello-world-server]
//! soft-rtt = "10ms"
//! ```
//!
//! The original system's JSON form, `{"SoftReq":{"RTT":20},"HardReq":{"RTT":100}}` with
//! milliseconds, is accepted too (as the defaults). Errors name the file, and for TOML the
//! line and the key; unknown keys are rejected so a typo cannot silently leave a default.

use std::{collections::BTreeMap, path::Path, time::Duration};

use serde::Deserialize;

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
    pub soft_rtt: Duration,
    pub hard_rtt: Duration,
}

/// Built-in defaults, the same as the root perf.conf documents.
pub const DEFAULT_LIMITS: Limits = Limits {
    soft_rtt: Duration::from_millis(20),
    hard_rtt: Duration::from_millis(100),
};

/// A parsed perf.conf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PerfConfig {
    pub defaults: Limits,
    pub policy: Policy,
    services: BTreeMap<String, Overrides>,
}

impl Default for PerfConfig {
    fn default() -> Self {
        Self {
            defaults: DEFAULT_LIMITS,
            policy: Policy::default(),
            services: BTreeMap::new(),
        }
    }
}

/// Limits a service (or its lookup record) sets; what it leaves out comes from further out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Overrides {
    #[serde(default, with = "humantime_serde_opt")]
    pub soft_rtt: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    pub hard_rtt: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct TomlFile {
    #[serde(default)]
    defaults: TomlDefaults,
    #[serde(default)]
    services: BTreeMap<String, Overrides>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct TomlDefaults {
    #[serde(default, with = "humantime_serde_opt")]
    soft_rtt: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    hard_rtt: Option<Duration>,
    #[serde(default)]
    policy: Policy,
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

/// Durations as humantime strings ("20ms"); a bare number is refused for lack of a unit.
mod humantime_serde_opt {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map(Some).map_err(|e| {
            serde::de::Error::custom(format!(
                "'{text}' is not a duration with a unit like \"20ms\": {e}"
            ))
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PerfError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

impl PerfConfig {
    /// Reads and checks a perf.conf (TOML, or the seed's JSON form).
    pub fn load(path: &Path) -> Result<Self, PerfError> {
        let display = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| PerfError::Read {
            path: display.clone(),
            source,
        })?;
        Self::parse(&text).map_err(|message| PerfError::Invalid {
            path: display,
            message,
        })
    }

    /// Parses perf.conf text; the error names the line and key where TOML says them.
    pub fn parse(text: &str) -> Result<Self, String> {
        let config = if text.trim_start().starts_with('{') {
            let seed: SeedJson =
                serde_json::from_str(text).map_err(|e| format!("seed JSON form: {e}"))?;
            let defaults = Limits {
                soft_rtt: Duration::from_millis(seed.soft_req.rtt_ms),
                hard_rtt: Duration::from_millis(seed.hard_req.rtt_ms),
            };
            Self {
                defaults,
                ..Self::default()
            }
        } else {
            let file: TomlFile =
                toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())?;
            let defaults = Limits {
                soft_rtt: file.defaults.soft_rtt.unwrap_or(DEFAULT_LIMITS.soft_rtt),
                hard_rtt: file.defaults.hard_rtt.unwrap_or(DEFAULT_LIMITS.hard_rtt),
            };
            Self {
                defaults,
                policy: file.defaults.policy,
                services: file.services,
            }
        };
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<(), String> {
        let mut all = vec![("defaults".to_owned(), self.defaults)];
        all.extend(self.services.keys().map(|name| {
            (
                format!("services.{name}"),
                self.limits_for(name, Overrides::default()),
            )
        }));
        for (section, limits) in all {
            if limits.soft_rtt > limits.hard_rtt {
                return Err(format!(
                    "[{section}]: soft-rtt {:?} is above hard-rtt {:?}",
                    limits.soft_rtt, limits.hard_rtt
                ));
            }
        }
        Ok(())
    }

    /// The limits of `service`: the lookup record's own limits win, then the service's section
    /// of this file, then its defaults.
    pub fn limits_for(&self, service: &str, record: Overrides) -> Limits {
        let section = self.services.get(service).copied().unwrap_or_default();
        Limits {
            soft_rtt: record
                .soft_rtt
                .or(section.soft_rtt)
                .unwrap_or(self.defaults.soft_rtt),
            hard_rtt: record
                .hard_rtt
                .or(section.hard_rtt)
                .unwrap_or(self.defaults.hard_rtt),
        }
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
        assert_eq!(config.defaults, DEFAULT_LIMITS);
        assert_eq!(config.policy, Policy::RttHistogram);
    }

    #[test]
    fn record_beats_service_section_beats_defaults() {
        let config = PerfConfig::parse(
            "[defaults]\nsoft-rtt = \"30ms\"\nhard-rtt = \"200ms\"\npolicy = \"peak-ewma\"\n\
             [services.api]\nsoft-rtt = \"5ms\"\n",
        )
        .unwrap();
        assert_eq!(config.policy, Policy::PeakEwma);
        assert_eq!(
            config.limits_for("other", Overrides::default()),
            Limits {
                soft_rtt: MS * 30,
                hard_rtt: MS * 200
            }
        );
        assert_eq!(
            config.limits_for("api", Overrides::default()),
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
            config.limits_for("api", record),
            Limits {
                soft_rtt: MS * 2,
                hard_rtt: MS * 9
            }
        );
    }

    #[test]
    fn the_seed_json_form_is_milliseconds() {
        let config =
            PerfConfig::parse(r#"{"SoftReq":{"RTT":100},"HardReq":{"RTT":1000}}"#).unwrap();
        assert_eq!(
            config.defaults,
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
        ];
        for (text, needles) in cases {
            let error = PerfConfig::parse(text).unwrap_err();
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
