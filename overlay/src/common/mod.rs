//! What every long-running binary shares: layered configuration (flags, config file,
//! environment), overlay flags, logs, the Prometheus endpoint and shutdown on signals.

pub mod conf_json;
pub mod config;
pub mod daemon;
pub mod http;
pub mod net;
pub mod overlay_args;
pub mod program;
pub mod telemetry;

use program::Program;

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
/// Tokio runtime (one worker thread per core), runs `run`, and turns an error into a message
/// on stderr and exit code 1 (usage errors exit with 2, as clap does).
pub fn run_binary<C, F>(run: impl FnOnce(C) -> F) -> std::process::ExitCode
where
    C: Program,
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    run_binary_with(tokio::runtime::Builder::new_multi_thread(), run)
}

/// [`run_binary`] on a runtime `builder` makes: `new_current_thread()` for a program that
/// starts whatever threads it needs itself (the proxy's workers), with no work-stealing
/// machinery (cross-thread wake-ups, a parked main thread beside the worker).
pub fn run_binary_with<C, F>(
    mut builder: tokio::runtime::Builder,
    run: impl FnOnce(C) -> F,
) -> std::process::ExitCode
where
    C: Program,
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    let name = C::NAME;
    let args = std::env::args_os().collect();
    let cli: C = match config::parse_layered_as(C::definition(), args, "config") {
        Ok(cli) => cli,
        Err(error) => {
            eprintln!("{name}: {error}");
            return std::process::ExitCode::from(2);
        }
    };
    let common = cli.common();
    telemetry::init_logs(common.debug, common.log_format);
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
