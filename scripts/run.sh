#!/usr/bin/env bash
# Starts a small local overlay on this machine and shows its RTT table: a ping-monitor
# (the bootstrap, P2P port 4001, metrics on :9100) and two peers that join through it.
# Ctrl-C stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --release --bin ping-monitor
bin=target/release/ping-monitor

pids=()
cleanup() {
  trap - INT TERM EXIT
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "stopped"
}
trap cleanup INT TERM EXIT

log=$(mktemp -d)
"$bin" --ephemeral --p2p-listen-addr 127.0.0.1:4001 --prom-listen-addr 127.0.0.1:9100 \
  >"$log/bootstrap.out" 2>"$log/bootstrap.err" &
pids+=($!)
for _ in $(seq 100); do
  addr=$(grep -m1 '/p2p/' "$log/bootstrap.out" || true)
  [ -n "$addr" ] && break
  sleep 0.1
done
[ -n "$addr" ] || { cat "$log/bootstrap.err" >&2; exit 1; }
echo "bootstrap: $addr"

for n in 1 2; do
  "$bin" --ephemeral --bootstrap "$addr" --p2p-listen-addr "127.0.0.1:$((4001 + n))" \
    --prom-listen-addr "127.0.0.1:$((9100 + 100 * n))" --hostname "peer-$n" \
    >"$log/peer-$n.out" 2>"$log/peer-$n.err" &
  pids+=($!)
done

echo "metrics: http://127.0.0.1:9100/metrics   peers (JSON): http://127.0.0.1:9100/peers"
echo "logs: $log   Ctrl-C to stop"
while true; do
  sleep 2
  echo "--- RTT from the bootstrap to each peer, milliseconds ($(date +%T))"
  curl -s http://127.0.0.1:9100/metrics | awk -F'[{}",= ]+' '
    $1 == "ping_rtt"      { last[$5] = $NF }
    $1 == "ping_ewma_rtt" { ewma[$5] = $NF }
    $1 == "ping_rtt_window" && $7 == "0.5"  { p50[$5] = $NF }
    $1 == "ping_rtt_window" && $7 == "0.99" { p99[$5] = $NF }
    END {
      printf "  %-54s %8s %8s %8s %8s\n", "peer", "last", "ewma", "p50", "p99"
      for (peer in last)
        printf "  %-54s %8.3f %8.3f %8.3f %8.3f\n", peer, last[peer], ewma[peer], p50[peer], p99[peer]
    }'
done
