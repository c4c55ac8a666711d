//! `l4-proxy`: layer-4 tunnels and service chains. See `proxy::l4` and `proxy::app`.

use mtc_overlay::common::run_binary_with;
use proxy::app;

fn main() -> std::process::ExitCode {
    app::tune_allocator();
    // The current-thread scheduler: the proxy starts its workers' threads itself.
    let runtime = tokio::runtime::Builder::new_current_thread();
    run_binary_with(runtime, app::run_l4)
}
