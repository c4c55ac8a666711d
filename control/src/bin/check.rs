//! `check`: is the network reachable and does a service resolve. See `control::check`.

use control::{check, common::run_binary};

fn main() -> std::process::ExitCode {
    run_binary(check::run)
}
