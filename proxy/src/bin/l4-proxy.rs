//! `l4-proxy`: layer-4 tunnels and service chains. See `proxy::l4` and `proxy::app`.

use control::common::run_binary_on_this_thread;
use proxy::app;

fn main() -> std::process::ExitCode {
    app::tune_allocator();
    run_binary_on_this_thread("l4-proxy", |cli: &app::L4Cli| cli.proxy.debug, app::run_l4)
}
