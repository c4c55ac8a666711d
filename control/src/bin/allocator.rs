//! `allocator`: starts service instances on demand. See `control::allocator`.

use control::{allocator::app, common::run_binary};

fn main() -> std::process::ExitCode {
    run_binary(app::run)
}
