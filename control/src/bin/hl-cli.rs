//! `hl-cli`: add, get, list and delete service records. See `control::lookup::cli`.

use control::{common::run_binary, lookup::cli};

fn main() -> std::process::ExitCode {
    run_binary(cli::run)
}
