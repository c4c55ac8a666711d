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
//! The file is polled (one read every `--perf-poll`, 1 s by default) rather than watched
//! through inotify: a poll also sees an editor's save-by-rename and a Kubernetes ConfigMap's
//! symlink swap, and costs one small read a second.

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

/// The configuration in use, and where it comes from.
#[derive(Debug)]
pub struct LivePerf {
    path: Option<PathBuf>,
    current: RwLock<Arc<PerfConfig>>,
    /// Bumped at each applied reload.
    generation: AtomicU64,
    /// The text last parsed, applied or not: a poll that reads it again does nothing.
    last_text: Mutex<Option<String>>,
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
            last_text: Mutex::new(text),
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

    /// `None`: polled, and the text is what was last looked at.
    fn reload_from(&self, path: &Path, trigger: Trigger) -> Option<Reload> {
        let text = match read(path) {
            Ok(text) => text,
            Err(error) => return Some(Reload::Invalid(error)),
        };
        {
            let mut last = self.last_text.lock().unwrap_or_else(|p| p.into_inner());
            if trigger == Trigger::Poll && last.as_deref() == Some(text.as_str()) {
                return None;
            }
            *last = Some(text.clone());
        }
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
                live.reload(trigger);
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

        std::fs::write(
            file.path(),
            "[defaults]\nsoft-rtt = \"7ms\"\nprobe-interval = \"1s\"\n",
        )
        .unwrap();
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
        assert!(!path.exists());
    }
}
