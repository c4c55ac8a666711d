//! perf.conf, live: read again on SIGHUP and when the file changes, without a restart.
//!
//! A reload parses the whole file first and swaps the configuration in one step; an invalid
//! or unreadable file keeps the running configuration, and its error (file, line, key) is
//! logged. Each reload is counted in `proxy_config_reloads_total{result}`: `applied`,
//! `unchanged` (a SIGHUP with nothing new) or `invalid`.
//!
//! Readers take no lock of their own per request: each worker's routing ([`crate::ingress`])
//! compares [`LivePerf::generation`] with the generation it applied, at each choice and tick,
//! and takes the new configuration when they differ. It then retunes every service in place: RTT history,
//! instances, ejections and connections survive a reload.
//!
//! The file is polled (one read every `--perf-poll`, 1 s by default, off the event loop)
//! rather than watched through inotify: a poll also sees an editor's save-by-rename and a
//! Kubernetes ConfigMap's symlink swap, and costs one small read a second. A change is
//! applied when two polls in a row read the same new text, so a file caught in the middle of
//! an in-place write is never applied; a missing or unreadable file is reported once.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use prometheus::{IntCounterVec, Opts, Registry};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use super::perf::{PerfConfig, PerfError};

/// What one reload did.
#[derive(Debug)]
pub enum Reload {
    /// The new configuration is in use.
    Applied,
    /// The file says what is in use already (or, polled, has not changed).
    Unchanged,
    /// Refused; the running configuration stays.
    Invalid(PerfError),
}

impl Reload {
    fn label(&self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Unchanged => "unchanged",
            Self::Invalid(_) => "invalid",
        }
    }
}

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// SIGHUP: the file is parsed even if it looks unchanged.
    Signal,
    /// A poll: the file is parsed only if its text changed since the last look.
    Poll,
}

/// What the polls have seen of the file.
#[derive(Debug, Default)]
struct Seen {
    /// The text last parsed, applied or not: a poll that reads it again does nothing.
    text: Option<String>,
    /// A new text read once, applied if the next poll reads it again.
    pending: Option<String>,
    /// The last read error reported.
    error: Option<String>,
}

/// The configuration in use, and where it comes from.
#[derive(Debug)]
pub struct LivePerf {
    path: Option<PathBuf>,
    current: RwLock<Arc<PerfConfig>>,
    /// Bumped at each applied reload.
    generation: AtomicU64,
    /// What the polls have seen.
    seen: Mutex<Seen>,
    reloads: IntCounterVec,
}

impl Default for LivePerf {
    /// The built-in defaults, from no file.
    fn default() -> Self {
        Self::new(None, PerfConfig::default(), None)
    }
}

fn reloads_counter() -> IntCounterVec {
    IntCounterVec::new(
        Opts::new(
            "proxy_config_reloads_total",
            "Reloads of perf.conf, by result (applied, unchanged, invalid)",
        ),
        &["result"],
    )
    .expect("a valid metric")
}

impl LivePerf {
    fn new(path: Option<PathBuf>, config: PerfConfig, text: Option<String>) -> Self {
        Self {
            path,
            current: RwLock::new(Arc::new(config)),
            generation: AtomicU64::new(0),
            seen: Mutex::new(Seen {
                text,
                ..Seen::default()
            }),
            reloads: reloads_counter(),
        }
    }

    /// Reads `path` (the built-in defaults without one).
    pub fn load(path: Option<&Path>) -> Result<Arc<Self>, PerfError> {
        let live = match path {
            Some(path) => {
                let text = read(path)?;
                let config = PerfConfig::parse(&text).map_err(|error| PerfError::Invalid {
                    path: path.display().to_string(),
                    error,
                })?;
                Self::new(Some(path.to_owned()), config, Some(text))
            }
            None => Self::default(),
        };
        Ok(Arc::new(live))
    }

    /// Counts reloads in `registry`.
    pub fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        for result in ["applied", "unchanged", "invalid"] {
            self.reloads.with_label_values(&[result]);
        }
        registry.register(Box::new(self.reloads.clone()))
    }

    /// A fixed configuration, from no file.
    pub fn fixed(config: PerfConfig) -> Arc<Self> {
        Arc::new(Self::new(None, config, None))
    }

    /// Changes at each applied reload; cheap enough to compare often.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The configuration in use and its generation.
    pub fn current(&self) -> (u64, Arc<PerfConfig>) {
        let current = self.current.read().unwrap_or_else(|p| p.into_inner());
        (self.generation(), Arc::clone(&current))
    }

    /// Reads the file again (see [`Trigger`]); logs and counts the result. Without a file
    /// there is nothing to read: unchanged.
    pub fn reload(&self, trigger: Trigger) -> Reload {
        let Some(path) = &self.path else {
            return Reload::Unchanged;
        };
        let result = self.reload_from(path, trigger);
        match &result {
            None => return Reload::Unchanged,
            Some(Reload::Applied) => {
                tracing::info!(file = %path.display(), ?trigger, "perf.conf reloaded");
            }
            Some(Reload::Unchanged) => {
                tracing::info!(file = %path.display(), ?trigger, "perf.conf unchanged");
            }
            Some(Reload::Invalid(error)) => {
                tracing::error!(%error, ?trigger, "perf.conf refused; the running configuration stays");
            }
        }
        let result = result.expect("handled above");
        self.reloads.with_label_values(&[result.label()]).inc();
        result
    }

    /// `None`: polled, and nothing new to report.
    fn reload_from(&self, path: &Path, trigger: Trigger) -> Option<Reload> {
        let read = read(path);
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let text = match read {
            Ok(text) => {
                seen.error = None;
                text
            }
            Err(error) => {
                // A file gone or unreadable is reported once, not at every poll.
                let message = error.to_string();
                if trigger == Trigger::Poll && seen.error.as_deref() == Some(message.as_str()) {
                    return None;
                }
                seen.error = Some(message);
                return Some(Reload::Invalid(error));
            }
        };
        if trigger == Trigger::Poll {
            if seen.text.as_deref() == Some(text.as_str()) {
                seen.pending = None;
                return None;
            }
            // A change is taken once two polls in a row read the same text: a file caught
            // in the middle of an in-place write is not applied.
            if seen.pending.as_deref() != Some(text.as_str()) {
                seen.pending = Some(text);
                return None;
            }
        }
        seen.pending = None;
        seen.text = Some(text.clone());
        drop(seen);
        let config = match PerfConfig::parse(&text) {
            Ok(config) => config,
            Err(error) => {
                return Some(Reload::Invalid(PerfError::Invalid {
                    path: path.display().to_string(),
                    error,
                }));
            }
        };
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        if **current == config {
            return Some(Reload::Unchanged);
        }
        *current = Arc::new(config);
        self.generation.fetch_add(1, Ordering::Release);
        Some(Reload::Applied)
    }

    /// Reloads on SIGHUP and, every `poll` (none if zero), when the file changed, until
    /// `stop`. The SIGHUP handler is installed before this returns, so that a SIGHUP from
    /// then on never ends the process (its default action).
    pub fn watch(self: &Arc<Self>, poll: Duration, stop: CancellationToken) -> std::io::Result<()> {
        let mut hangups = signal(SignalKind::hangup())?;
        let live = Arc::clone(self);
        tokio::spawn(async move {
            let mut polls = (!poll.is_zero() && live.path.is_some()).then(|| {
                let mut every = tokio::time::interval(poll);
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                every
            });
            loop {
                let trigger = tokio::select! {
                    Some(()) = hangups.recv() => Trigger::Signal,
                    _ = async { polls.as_mut().expect("guarded").tick().await }, if polls.is_some() => Trigger::Poll,
                    _ = stop.cancelled() => return,
                };
                if trigger == Trigger::Signal && live.path.is_none() {
                    tracing::info!("SIGHUP: no perf.conf (--perf-conf) to reload");
                    continue;
                }
                // The read is file I/O: off the event loop, which serves a worker.
                let reloading = Arc::clone(&live);
                let _ = tokio::task::spawn_blocking(move || reloading.reload(trigger)).await;
            }
        });
        Ok(())
    }

    /// Reloads counted with `result` (for tests).
    pub fn reloads(&self, result: &str) -> u64 {
        self.reloads.with_label_values(&[result]).get()
    }
}

fn read(path: &Path) -> Result<String, PerfError> {
    std::fs::read_to_string(path).map_err(|source| PerfError::Read {
        path: path.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live_at(path: &Path) -> Arc<LivePerf> {
        LivePerf::load(Some(path)).unwrap()
    }

    #[test]
    fn a_valid_edit_is_applied_whole_and_an_invalid_one_keeps_the_running_configuration() {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), "[defaults]\nsoft-rtt = \"5ms\"\n").unwrap();
        let live = live_at(file.path());
        let (generation, config) = live.current();
        assert_eq!(config.defaults.limits.soft_rtt, Duration::from_millis(5));

        // Polled without a change: nothing happens, nothing is counted.
        assert!(matches!(live.reload(Trigger::Poll), Reload::Unchanged));
        assert_eq!(live.reloads("unchanged"), 0);
        // SIGHUP without a change: counted as such.
        assert!(matches!(live.reload(Trigger::Signal), Reload::Unchanged));
        assert_eq!(
            (live.reloads("unchanged"), live.generation()),
            (1, generation)
        );

        // Caught mid-write: read once, not applied; the whole file read twice is.
        std::fs::write(file.path(), "[defaults]\nsoft-rtt = \"7ms\"\n").unwrap();
        assert!(matches!(live.reload(Trigger::Poll), Reload::Unchanged));
        std::fs::write(
            file.path(),
            "[defaults]\nsoft-rtt = \"7ms\"\nprobe-interval = \"1s\"\n",
        )
        .unwrap();
        assert!(matches!(live.reload(Trigger::Poll), Reload::Unchanged));
        assert_eq!(live.generation(), generation);
        assert!(matches!(live.reload(Trigger::Poll), Reload::Applied));
        let (after, config) = live.current();
        assert_ne!(after, generation);
        assert_eq!(config.defaults.limits.soft_rtt, Duration::from_millis(7));
        assert_eq!(
            config.defaults.tuning.probe_interval,
            Duration::from_secs(1)
        );

        // A bad value in an otherwise good file: nothing of it is applied.
        std::fs::write(
            file.path(),
            "[defaults]\nsoft-rtt = \"9ms\"\nprobe-interval = \"never\"\n",
        )
        .unwrap();
        assert!(matches!(live.reload(Trigger::Poll), Reload::Unchanged));
        match live.reload(Trigger::Poll) {
            Reload::Invalid(error) => {
                let error = error.to_string();
                let file = file.path().display().to_string();
                for needle in [file.as_str(), "line 3", "probe-interval"] {
                    assert!(error.contains(needle), "'{error}' names {needle}");
                }
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(live.reloads("invalid"), 1);
        assert_eq!(live.current().0, after);
        assert_eq!(live.current().1, config);
        // The same bad text polled again is not reported again.
        assert!(matches!(live.reload(Trigger::Poll), Reload::Unchanged));
        assert_eq!(live.reloads("invalid"), 1);

        // A file gone is refused too, and the configuration stays.
        let path = file.path().to_owned();
        drop(file);
        assert!(matches!(live.reload(Trigger::Signal), Reload::Invalid(_)));
        assert_eq!(
            live.current().1.defaults.limits.soft_rtt,
            Duration::from_millis(7)
        );
        assert_eq!(live.reloads("applied"), 1);
        // ...and reported once, not at every poll.
        assert!(matches!(live.reload(Trigger::Poll), Reload::Unchanged));
        assert_eq!(live.reloads("invalid"), 2);
        assert!(!path.exists());
    }
}
