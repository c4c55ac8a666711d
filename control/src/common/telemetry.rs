//! Logs: `tracing` to stderr, filtered by `RUST_LOG` (default `info`, or `debug` with
//! `--debug`). Standard output stays free for what users copy (addresses, results).

use tracing_subscriber::EnvFilter;

pub fn init_logs(debug: bool) {
    let default = if debug {
        "debug,libp2p=info,multistream_select=info,yamux=info"
    } else {
        "info"
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
