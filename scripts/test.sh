#!/usr/bin/env bash
# Runs every check CI runs: formatting, lints and the whole test suite (unit tests and the
# integration tests that start real processes, a real Prometheus, real sockets on loopback).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# Where the time goes (CI has a budget): each stage says when it ended.
stage() { echo "test.sh: $1 done at $((SECONDS / 60))m$((SECONDS % 60))s"; }
stage setup

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
stage "fmt and clippy"
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
# Built with the test-image profile (Cargo.toml: less optimised, minutes quicker to build cold);
# the images tests bake of their own use it too.
export SIDECAR_PROFILE=test-image
if docker info >/dev/null 2>&1; then
  MTC_TEST_IMAGE_TAR=$(./sidecar-image/build.sh target/test-image)
  export MTC_TEST_IMAGE_TAR
  stage "docs and the test image"
elif [ "${MTC_SKIP_DOCKER:-}" != 1 ]; then
  echo "test: no Docker engine answers (docker info fails): start it, or set MTC_SKIP_DOCKER=1" >&2
  exit 1
fi

# Every integration test runs under a deadline (#[testkit::deadline_test], default 240 s), so an await
# that never ends fails that test by name; a bare #[tokio::test] there would have none.
if grep -n '#\[tokio::test' control/tests/*.rs proxy/tests/*.rs; then
  echo "test: integration tests use #[testkit::deadline_test] (a Tokio test with a deadline), not #[tokio::test]" >&2
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
# A backstop beyond the per-test deadlines (a test blocked outside an await, a build that
# hangs): the run fails instead of holding CI until its own limit. Building is included.
timeout -k 30 "${MTC_TEST_TIMEOUT:-2400}" cargo test --workspace --locked 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
if [ "$status" -eq 124 ]; then
  echo "test: cargo test did not end within ${MTC_TEST_TIMEOUT:-2400} s (see the tests 'running for over 60 seconds' above)" >&2
fi
set -e
stage "cargo test"
# The tree above is not the whole story (cargo unifies features across a workspace build):
# the proxy binary the workspace build made must hold no etcd or Docker client code either.
if [ "$status" -eq 0 ] && strings "${CARGO_TARGET_DIR:-target}/debug/proxy" | grep -Eq 'etcd_client|bollard::'; then
  echo "test: target/debug/proxy (a workspace build) holds etcd or Docker client code" >&2
  status=1
fi
# The whole benchmark suite in its quick mode (small sizes, short runs): proves every scenario
# runs end to end and writes its report and plots (elsewhere than bench/, which holds the
# committed run); nothing is asserted about speed.
if [ "$status" -eq 0 ] && ! cargo build -q -p bench --locked; then
  echo "building the benchmarks failed"
  status=1
fi
stage "building bench"
if [ "$status" -eq 0 ]; then
  if ! "${CARGO_TARGET_DIR:-target}/debug/bench" --out "$bench_out" all --quick >"$log.bench" 2>&1; then
    # A panic's message, or the error main returned, comes before its backtrace, which
    # would fill the tail.
    grep -B2 -A8 -E 'panicked|^Error: ' "$log.bench" || true
    tail -40 "$log.bench"
    echo "the benchmark suite's quick mode failed"
    status=1
  else
    echo "bench all --quick: $(grep -c '^## ' "$bench_out/RESULTS.md") scenarios, $(ls "$bench_out/results" | wc -l) plots"
    (grep '^bench: .* took' "$log.bench" || true) | sed 's/^bench: //' | paste -sd, - |
      sed 's/,/, /g; s/^/bench all --quick: /'
  fi
fi
# Every parser of untrusted bytes, fuzzed briefly (fuzz/: one crate, one build, a target per
# parser): each target runs FUZZ_SECONDS from a temporary copy of its committed seed corpus
# (fuzz/corpus/<target>/, which libFuzzer would grow), and any crash, failed round trip or
# broken invariant fails the run. cargo-fuzz wants nightly flags; RUSTC_BOOTSTRAP lets the
# stable toolchain accept them, and without a sanitizer none is needed. Debug assertions are
# on (an overflow is a crash), and an input that takes over 10 s is one too. Two targets run
# at a time (libFuzzer uses one core each), each with its own log.
stage "bench all --quick"
# Built in the dev profile without debug info (fuzz/Cargo.toml): a cold build takes 1.5 min
# here rather than 2 with debug info or 11 optimised (CI starts cold), for about a tenth of
# the runs per second; FUZZ_RELEASE=1 builds optimised for longer runs.
if [ "${FUZZ_RELEASE:-}" = 1 ]; then
  fuzz_flags=(--sanitizer none --debug-assertions)
else
  fuzz_flags=(--dev --sanitizer none)
fi
fuzz_tmp=$(mktemp -d)
fuzz_failed=0
fuzz_one() {
  cp -r "fuzz/corpus/$1" "$fuzz_tmp/$1"
  if (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run "${fuzz_flags[@]}" "$1" "$fuzz_tmp/$1" -- \
      -max_total_time="${FUZZ_SECONDS:-10}" -timeout=10) >"$fuzz_tmp/$1.log" 2>&1; then
    touch "$fuzz_tmp/$1.passed"
  fi
}
if ! (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz build "${fuzz_flags[@]}") >"$fuzz_tmp/build.log" 2>&1; then
  tail -40 "$fuzz_tmp/build.log"
  echo "building the fuzz targets failed (full log: $fuzz_tmp/build.log)"
  fuzz_failed=1
elif ! fuzz_targets=$(cd fuzz && cargo fuzz list) || [ -z "$fuzz_targets" ]; then
  echo "fuzz: cargo fuzz list names no target"
  fuzz_failed=1
else
  running=0
  for target in $fuzz_targets; do
    if [ -d "fuzz/corpus/$target" ]; then
      fuzz_one "$target" &
      running=$((running + 1))
      if [ "$running" -ge 2 ]; then
        wait -n || true
        running=$((running - 1))
      fi
    fi
  done
  wait
  for target in $fuzz_targets; do
    if [ ! -d "fuzz/corpus/$target" ]; then
      echo "fuzz $target: no seed corpus (fuzz/corpus/$target)"
      fuzz_failed=1
    elif [ -e "$fuzz_tmp/$target.passed" ]; then
      sed -nE "s/^Done ([0-9]+) runs.*/fuzz $target: \1 runs/p" "$fuzz_tmp/$target.log"
    else
      # The panic's message and the input (cargo fuzz prints it after the backtrace).
      grep -A4 -E 'panicked|ERROR: libFuzzer' "$fuzz_tmp/$target.log" || true
      grep -A8 -E '^(Failing input|Output of)' "$fuzz_tmp/$target.log" ||
        tail -20 "$fuzz_tmp/$target.log"
      echo "fuzz $target: failed (full log: $fuzz_tmp/$target.log)"
      fuzz_failed=1
    fi
  done
fi
if [ "$fuzz_failed" -eq 0 ]; then
  rm -rf "$fuzz_tmp"
else
  status=1
fi

stage fuzzing
# One closing line for the whole suite (cargo prints one per test binary): how many ran,
# passed, failed and were skipped (a skipped test returns early, so cargo counts it passed).
skipped=$(sort -u "$MTC_SKIPPED_LOG" | wc -l)
sort -u "$MTC_SKIPPED_LOG" | sed 's/^/skipped: /'
awk -v skipped="$skipped" '/^test result:/ { passed += $4; failed += $6; ignored += $8 }
  END { printf "%d tests: %d passed, %d failed, %d skipped, %d ignored\n",
        passed + failed + ignored, passed - skipped, failed, skipped, ignored }' "$log"
exit "$status"
