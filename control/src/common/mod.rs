//! What every long-running binary shares: layered configuration (flags, config file,
//! environment), overlay flags, logs, the Prometheus endpoint and shutdown on signals.

pub mod config;
pub mod daemon;
pub mod http;
pub mod net;
pub mod overlay_args;
pub mod telemetry;

/// Resolves when the process receives SIGINT (Ctrl-C) or SIGTERM (`docker stop`, `kill`).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received, shutting down"),
        _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
    }
}

/// The `main` of every binary: parses the layered configuration of `C`, starts logs and a
/// Tokio runtime, runs `run`, and turns an error into a message on stderr and exit code 1
/// (usage errors exit with 2, as clap does).
pub fn run_binary<C, F>(
    name: &str,
    debug: impl FnOnce(&C) -> bool,
    run: impl FnOnce(C) -> F,
) -> std::process::ExitCode
where
    C: clap::CommandFactory + clap::FromArgMatches,
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    run_binary_with_threads(name, debug, |_| None, run)
}

/// [`run_binary`] with the number of runtime worker threads chosen from the configuration
/// (`None`: one per core, Tokio's default; one: the current-thread scheduler on the calling
/// thread).
pub fn run_binary_with_threads<C, F>(
    name: &str,
    debug: impl FnOnce(&C) -> bool,
    worker_threads: impl FnOnce(&C) -> Option<usize>,
    run: impl FnOnce(C) -> F,
) -> std::process::ExitCode
where
    C: clap::CommandFactory + clap::FromArgMatches,
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    let cli: C = match config::parse_layered(std::env::args_os().collect(), "config") {
        Ok(cli) => cli,
        Err(error) => {
            eprintln!("{name}: {error}");
            return std::process::ExitCode::from(2);
        }
    };
    telemetry::init_logs(debug(&cli));
    // One worker: Tokio's current-thread scheduler, on this thread, with no work-stealing
    // machinery (cross-thread wake-ups, a parked main thread beside the worker).
    let mut builder = match worker_threads(&cli) {
        Some(1 | 0) => tokio::runtime::Builder::new_current_thread(),
        Some(threads) => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(threads);
            builder
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("{name}: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{name}: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
