//! `proxy`: the local ingress and sidecar. See `proxy::app`.

use control::common::run_binary_with_threads;
use proxy::app;

fn main() -> std::process::ExitCode {
    app::tune_allocator();
    run_binary_with_threads(
        "proxy",
        |cli: &app::Cli| cli.debug,
        |cli| Some(cli.worker_threads),
        app::run,
    )
}
