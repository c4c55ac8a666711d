//! `proxy`: the local ingress and sidecar. See `proxy::app`.

use control::common::run_binary;
use proxy::app;

fn main() -> std::process::ExitCode {
    run_binary("proxy", |cli: &app::Cli| cli.debug, app::run)
}
