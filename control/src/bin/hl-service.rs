//! `hl-service`: the lookup service. See `control::lookup`.

use control::{common::run_binary, lookup::app};

fn main() -> std::process::ExitCode {
    run_binary(app::run)
}
