#!/usr/bin/env bash
# Builds the hello-world-server image with no registry: static (musl) proxy and
# helloworldserver, a FROM-scratch image, and its `docker save` tarball.
#
#   sidecar-image/build.sh [OUT_DIR]        default OUT_DIR: target/sidecar-image
#
# Prints the tarball's path. IMAGE_TAG overrides the tag
# (default multi-tier-cloud/hello-world-server:latest).
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-target/sidecar-image}")
tag=${IMAGE_TAG:-multi-tier-cloud/hello-world-server:latest}

# Its own target directory: the proxy built alone links neither the etcd nor a Docker client
# (a workspace build would unify features), and this build never waits on another cargo.
export CARGO_TARGET_DIR=${SIDECAR_TARGET_DIR:-target/sidecar-build}
musl=x86_64-unknown-linux-musl
cargo build --release --locked --quiet --target "$musl" -p proxy --bin proxy >&2
cargo build --release --locked --quiet --target "$musl" -p helloworld >&2

context="$out/context"
rm -rf "$context"
mkdir -p "$context"
cp "$CARGO_TARGET_DIR/$musl/release/proxy" "$CARGO_TARGET_DIR/$musl/release/helloworldserver" \
   perf.conf sidecar-image/Dockerfile "$context/"
strip "$context/proxy" "$context/helloworldserver"
docker build --quiet --tag "$tag" "$context" >&2
docker save --output "$out/hello-world-server.tar" "$tag"
echo "$out/hello-world-server.tar"
