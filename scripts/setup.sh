#!/usr/bin/env bash
# Installs what building, running and testing multi-tier-cloud needs on a Debian machine.
# Idempotent: packages already present are skipped, so every run after the first is quick.
# Called by scripts/run.sh and scripts/test.sh; safe to run by hand.
set -euo pipefail

# Debian packages and why each is here:
#   protobuf-compiler  etcd-client's build script needs protoc (and libprotobuf-dev its includes)
#   etcd-server        the lookup's cluster store (tests start their own etcd on loopback)
#   etcd-client        etcdctl, for inspecting that store
#   prometheus         tests scrape our /metrics with a real Prometheus; promtool lints them
#   musl-tools         static binaries for FROM-scratch sidecar images
#   iproute2, procps   network namespaces and process inspection in tests
#   nginx, haproxy     the proxies the benchmarks compare ours with (their own processes,
#                      generated configs; the packaged services are stopped)
#   util-linux         taskset, to pin benchmark processes to CPUs
#   python3            the UDP echo service an allocator test registers as a user's script
#   binutils           strings and strip: test.sh checks what the proxy binary links
PACKAGES=(protobuf-compiler libprotobuf-dev etcd-server etcd-client prometheus musl-tools iproute2 procps curl nginx haproxy util-linux python3 binutils)

missing=()
for pkg in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done

if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}" >&2
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  # --no-install-recommends keeps prometheus from dragging in a web stack we never use.
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian's packages start their daemons where an init system runs; our tests start their
  # own instances on loopback ports, so stop the packaged ones if they came up.
  for svc in prometheus etcd nginx haproxy; do
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
      $SUDO systemctl stop "$svc" || true
    elif [ -x "/etc/init.d/$svc" ]; then
      # No systemd (a container): the package's init script may have started it.
      $SUDO "/etc/init.d/$svc" stop >/dev/null 2>&1 || true
    fi
  done
fi

if command -v rustup >/dev/null 2>&1; then
  if ! rustup target list --installed | grep -q '^x86_64-unknown-linux-musl$'; then
    rustup target add x86_64-unknown-linux-musl
  fi
  # cargo-fuzz runs the fuzz targets in fuzz/, one per parser (briefly, in scripts/test.sh).
  if ! command -v cargo-fuzz >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked --quiet
  fi
  for component in rustfmt clippy; do
    if ! rustup component list --installed | grep -q "^$component"; then
      rustup component add "$component"
    fi
  done
fi
