#!/usr/bin/env bash
# Builds the release agent for aarch64 with plain cargo and Debian's cross gcc, strips it and
# prints its size. Needs: rustup target add aarch64-unknown-linux-gnu;
# apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross binutils-aarch64-linux-gnu.
# Usage: cross/build-aarch64.sh [gnu|musl]   (musl: a static binary for older board libcs)
set -euo pipefail
cd "$(dirname "$0")/.."
libc=${1:-gnu}
target=aarch64-unknown-linux-$libc
profile=${PROFILE:-release}
cargo build --profile "$profile" --locked --target "$target" -p flightnode-agent
bin=target/$target/$profile/flightnode-agent
aarch64-linux-gnu-strip "$bin" 2>/dev/null || true
size=$(stat -c %s "$bin")
awk -v b="$bin" -v s="$size" 'BEGIN { printf "%s\t%d bytes (%.1f MiB)\n", b, s, s / 1048576 }'
