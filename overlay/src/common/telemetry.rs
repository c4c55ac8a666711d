//! Logs: `tracing` to stderr, filtered by `RUST_LOG` (default `info`, or `debug` with
//! `--debug`), as text or, with `--log-format json`, one JSON object per line (`timestamp`,
//! `level`, `target`, `fields` with `message`, and the span) for log collectors. Standard
//! output stays free for what users copy (addresses, results).

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(clap::ValueEnum, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// For people.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Sends logs to standard error in `format`, filtered by `RUST_LOG` if set, else at `info`
/// (`debug` if `debug` is true, with libp2p's own crates kept at `info`). Does nothing if a
/// logger is already installed.
pub fn init_logs(debug: bool, format: LogFormat) {
    let default = if debug {
        "debug,libp2p=info,multistream_select=info,yamux=info"
    } else {
        "info"
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => logs.try_init(),
        LogFormat::Json => logs.json().try_init(),
    };
}
