#!/usr/bin/env bash
# One command for a whole local network: a ping-monitor (bootstrap, P2P 127.0.0.1:4001,
# metrics :9100), an hl-service (embedded store, metrics :9102), an allocator (Docker when an
# engine answers, else processes; metrics :9101), the hello-world-server registered, and an
# ingress proxy on 127.0.0.1:4200. Prints the curl line; Ctrl-C stops everything it started,
# instances included, and removes its temporary data, so the next run starts clean.
#
# MTC_BIN_DIR uses binaries already built there instead of building release ones;
# MTC_IMAGE_TAR uses an image tarball already built (sidecar-image/build.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${MTC_BIN_DIR:-}" ]; then
  ./scripts/setup.sh
  cargo build --release --locked -p control -p proxy -p helloworld
  MTC_BIN_DIR=target/release
fi
bin=$(realpath "$MTC_BIN_DIR")
work=$(mktemp -d -t multi-tier-cloud.XXXXXX)

pids=()
cleanup() {
  trap - INT TERM EXIT
  # Newest first: the ingress, then the allocator (which stops its instances), then the rest.
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill -TERM "${pids[i]}" 2>/dev/null || true
    wait "${pids[i]}" 2>/dev/null || true
  done
  rm -rf "$work"
  echo "stopped; nothing left running"
}
# Ctrl-C ends it with 130 and SIGTERM with 143, as for any command a signal interrupted.
trap 'cleanup; exit 130' INT
trap 'cleanup; exit 143' TERM
trap cleanup EXIT

# start NAME COMMAND...: runs it in the background, its output in $work/NAME.{out,err}.
start() {
  local name=$1
  shift
  "$@" >"$work/$name.out" 2>"$work/$name.err" &
  pids+=($!)
}

# wait_for NAME PATTERN: the first line of NAME's output matching PATTERN (10 s at most).
wait_for() {
  for _ in $(seq 200); do
    if line=$(grep -m1 -- "$2" "$work/$1.out" 2>/dev/null); then
      echo "$line"
      return 0
    fi
    if ! kill -0 "${pids[-1]}" 2>/dev/null; then break; fi
    sleep 0.05
  done
  echo "run: $1 did not start:" >&2
  cat "$work/$1.err" >&2
  return 1
}

start ping-monitor "$bin/ping-monitor" --ephemeral \
  --p2p-listen-addr 127.0.0.1:4001 --prom-listen-addr 127.0.0.1:9100
boot=$(wait_for ping-monitor '/p2p/')

start hl-service "$bin/hl-service" --ephemeral --bootstrap "$boot" --data-dir "$work/hl-service" \
  --p2p-listen-addr 127.0.0.1:0 --prom-listen-addr 127.0.0.1:9102
wait_for hl-service 'metrics:' >/dev/null

if docker info >/dev/null 2>&1; then
  runtime=docker
  tar=${MTC_IMAGE_TAR:-$(./sidecar-image/build.sh "$work/image")}
  artifact=(--file "$tar" hello-world-server)
else
  runtime=process
  artifact=(--exec "$bin/helloworldserver" hello-world-server -- helloworldserver '$SERVICE_PORT')
fi
if ! "$bin/hl-cli" --bootstrap "$boot" add "${artifact[@]}" >"$work/hl-cli.out" 2>"$work/hl-cli.err"; then
  cat "$work/hl-cli.err" >&2
  exit 1
fi

start allocator "$bin/allocator" --ephemeral --bootstrap "$boot" --runtime "$runtime" \
  --proxy-binary "$bin/proxy" --data-dir "$work/allocator" --host-ip 127.0.0.1 \
  --p2p-listen-addr 127.0.0.1:0 --prom-listen-addr 127.0.0.1:9101
wait_for allocator 'runtime:' >/dev/null
allocator=$(wait_for allocator 'listening on' | cut -d' ' -f2)

start proxy "$bin/proxy" --ephemeral --bootstrap "$boot" --prom-listen-addr 127.0.0.1:9110 4200
proxy_metrics=$(wait_for proxy 'metrics:')
wait_for proxy 'ingress:' >/dev/null

cat <<MSG
multi-tier-cloud is running on this machine (instances: $runtime runtime).

  curl 127.0.0.1:4200/hello-world-server

The first request starts an instance (the allocator), later ones reuse it; an instance that
serves nothing for 60 s is stopped. Metrics: ping-monitor http://127.0.0.1:9100/metrics,
allocator http://127.0.0.1:9101/metrics, hl-service http://127.0.0.1:9102/metrics,
ingress proxy ${proxy_metrics#metrics: }.
Bootstrap: $boot
Allocator: $allocator (its instances carry the label mtc.allocator=$allocator)
Logs: $work (removed on exit). Ctrl-C stops everything.
MSG
wait "${pids[@]}"
