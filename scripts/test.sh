#!/usr/bin/env bash
# Runs every check CI runs: formatting, lints and the whole test suite (unit tests and the
# integration tests that start real processes, a real Prometheus, real sockets on loopback).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# Docs that build without warnings (broken links, stray HTML). Private items are documented
# too, as a newcomer reads them, so links to them are fine.
RUSTDOCFLAGS="-D warnings -A rustdoc::private_intra_doc_links" \
  cargo doc --no-deps --workspace --document-private-items --locked --quiet

# The proxy is baked into every service image: it must not link the etcd or a Docker client.
# It depends on mtc-overlay, not on control; its tests alone use control.
proxy_deps=$(cargo tree -p proxy -e normal --prefix none --locked)
if grep -Eq '^(etcd-client|bollard|control) ' <<<"$proxy_deps"; then
  echo "test: the proxy's dependency tree contains control, etcd-client or bollard" >&2
  exit 1
fi

# The FROM-scratch test image (static proxy and helloworldserver) the Docker tests run,
# built once here rather than by each test. A machine without a Docker engine fails those
# tests, unless MTC_SKIP_DOCKER=1 says it is meant to have none.
if docker info >/dev/null 2>&1; then
  MTC_TEST_IMAGE_TAR=$(./sidecar-image/build.sh target/test-image)
  export MTC_TEST_IMAGE_TAR
elif [ "${MTC_SKIP_DOCKER:-}" != 1 ]; then
  echo "test: no Docker engine answers (docker info fails): start it, or set MTC_SKIP_DOCKER=1" >&2
  exit 1
fi

log=$(mktemp)
bench_out=$(mktemp -d)
# Tests that cannot run here (no Docker engine with MTC_SKIP_DOCKER=1) say so in this file
# (testkit::skipped); the summary counts them as skipped, not passed.
MTC_SKIPPED_LOG=$(mktemp)
export MTC_SKIPPED_LOG
trap 'rm -rf "$log" "$log.bench" "$bench_out" "$MTC_SKIPPED_LOG"' EXIT
set +e
cargo test --workspace --locked 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# The tree above is not the whole story (cargo unifies features across a workspace build):
# the proxy binary the workspace build made must hold no etcd or Docker client code either.
if [ "$status" -eq 0 ] && strings target/debug/proxy | grep -Eq 'etcd_client|bollard::'; then
  echo "test: target/debug/proxy (a workspace build) holds etcd or Docker client code" >&2
  status=1
fi
# The whole benchmark suite in its quick mode (small sizes, short runs): proves every scenario
# runs end to end and writes its report and plots (elsewhere than bench/, which holds the
# committed run); nothing is asserted about speed.
if [ "$status" -eq 0 ]; then
  if ! cargo run -q -p bench --locked -- --out "$bench_out" all --quick >"$log.bench" 2>&1; then
    # A panic's message, or the error main returned, comes before its backtrace, which
    # would fill the tail.
    grep -B2 -A8 -E 'panicked|^Error: ' "$log.bench" || true
    tail -40 "$log.bench"
    echo "the benchmark suite's quick mode failed"
    status=1
  else
    echo "bench all --quick: $(grep -c '^## ' "$bench_out/RESULTS.md") scenarios, $(ls "$bench_out/results" | wc -l) plots"
  fi
fi
# The protocol codec's fuzz target, briefly: any crash or failed round trip fails the run.
# cargo-fuzz wants nightly flags; RUSTC_BOOTSTRAP lets the stable toolchain accept them, and
# without a sanitizer none is needed.
fuzz_log=$(mktemp)
if ! (cd control/fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run codec --sanitizer none -- \
      -max_total_time="${FUZZ_SECONDS:-20}") >"$fuzz_log" 2>&1; then
  tail -40 "$fuzz_log"
  echo "fuzzing the protocol codec failed (full log: $fuzz_log)"
  status=1
else
  grep -E '^Done [0-9]+ runs' "$fuzz_log" | sed 's/^/fuzz codec: /'
fi

# One closing line for the whole suite (cargo prints one per test binary): how many ran,
# passed, failed and were skipped (a skipped test returns early, so cargo counts it passed).
skipped=$(sort -u "$MTC_SKIPPED_LOG" | wc -l)
sort -u "$MTC_SKIPPED_LOG" | sed 's/^/skipped: /'
awk -v skipped="$skipped" '/^test result:/ { passed += $4; failed += $6; ignored += $8 }
  END { printf "%d tests: %d passed, %d failed, %d skipped, %d ignored\n",
        passed + failed + ignored, passed - skipped, failed, skipped, ignored }' "$log"
exit "$status"
