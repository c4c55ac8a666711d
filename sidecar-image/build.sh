#!/usr/bin/env bash
# Bakes services into images with their proxy, with no registry.
#
#   sidecar-image/build.sh [OUT_DIR] [SERVICE_DIR]
#
# Always builds the proxy base image multi-tier-cloud/proxy-base:latest (base/Dockerfile: the
# static musl proxy and perf.conf). Then, without SERVICE_DIR, the hello-world-server image
# (Dockerfile here, with a static helloworldserver), saved as OUT_DIR/hello-world-server.tar;
# with SERVICE_DIR, the image of that directory (its Dockerfile builds FROM the base; an
# executable `prepare` in it runs first with CONTEXT, CARGO_TARGET_DIR and SIDECAR_BIN_DIR
# (where the profile's musl binaries go) set, and SIDECAR_PROFILE if it is, to put what the
# image copies into the context), tagged multi-tier-cloud/<dir name>:latest and saved as
# OUT_DIR/<dir name>.tar. OUT_DIR defaults to target/sidecar-image. Prints the tarball's path.
# IMAGE_TAG overrides the service image's tag; SIDECAR_PROFILE the Cargo profile the binaries
# are built with (default release; scripts/test.sh uses test-image, quicker to build).
set -euo pipefail
# Paths as the caller gave them, before moving to the repository's root.
out=$(realpath -m "${1:-target/sidecar-image}")
service_dir=${2:+$(realpath "$2")}
cd "$(dirname "$0")/.."

# Its own target directory: this build never waits on another cargo.
export CARGO_TARGET_DIR=$(realpath -m "${SIDECAR_TARGET_DIR:-target/sidecar-build}")
musl=x86_64-unknown-linux-musl
profile=${SIDECAR_PROFILE:-release}
# Where cargo puts that profile's binaries (dev and test share debug/); prepare scripts read it.
case $profile in
  dev | test) profile_dir=debug ;;
  bench) profile_dir=release ;;
  *) profile_dir=$profile ;;
esac
export SIDECAR_BIN_DIR="$CARGO_TARGET_DIR/$musl/$profile_dir"
release=$SIDECAR_BIN_DIR

# The base image.
cargo build --profile "$profile" --locked --quiet --target "$musl" -p proxy --bin proxy >&2
# Build contexts of their own, so that builds running at once (tests) do not clash.
mkdir -p "$out"
base=$(mktemp -d "$out/base.XXXXXX")
context=$(mktemp -d "$out/context.XXXXXX")
trap 'rm -rf "$base" "$context"' EXIT
cp "$release/proxy" perf.conf sidecar-image/base/Dockerfile "$base/"
strip "$base/proxy"
docker build --quiet --tag multi-tier-cloud/proxy-base:latest "$base" >&2

# The service's image.
if [ -z "$service_dir" ]; then
  name=hello-world-server
  cargo build --profile "$profile" --locked --quiet --target "$musl" -p helloworld --bin helloworldserver >&2
  cp "$release/helloworldserver" sidecar-image/Dockerfile "$context/"
  strip "$context/helloworldserver"
else
  # The directory's name is the image's: Docker wants it lower case.
  name=$(basename "$service_dir" | tr '[:upper:]' '[:lower:]')
  cp -r "$service_dir/." "$context/"
  rm -f "$context/prepare"
  if [ -x "$service_dir/prepare" ]; then
    CONTEXT="$context" "$service_dir/prepare"
  fi
fi
tag=${IMAGE_TAG:-multi-tier-cloud/$name:latest}
docker build --quiet --tag "$tag" "$context" >&2
docker save --output "$out/$name.tar" "$tag"
echo "$out/$name.tar"
