#!/usr/bin/env bash
# Runs every check CI runs: formatting, lints and the whole test suite (unit tests and the
# integration tests that start real processes, a real Prometheus, real sockets on loopback).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
