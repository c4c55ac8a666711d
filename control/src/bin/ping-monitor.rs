//! `ping-monitor`: bootstrap node of the overlay and RTT exporter. See `control::monitor`.

use control::{common::run_binary, monitor::app};

fn main() -> std::process::ExitCode {
    run_binary(app::run)
}
