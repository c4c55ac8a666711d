//! `proxy`: the local ingress and sidecar. See `proxy::app`.

use control::common::run_binary_on_this_thread;
use proxy::app;

fn main() -> std::process::ExitCode {
    app::tune_allocator();
    run_binary_on_this_thread("proxy", |cli: &app::Cli| cli.debug, app::run)
}
