#!/usr/bin/env bash
# Builds the release agent for aarch64 with plain cargo and Debian's cross gcc as the link driver,
# and prints its size. The profile strips it.
# Needs: rustup target add aarch64-unknown-linux-musl (or -gnu);
#        apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross binutils-aarch64-linux-gnu.
# Usage: cross/build-aarch64.sh [musl|gnu]
#   musl (default, what releases ship): static, runs on any aarch64 Linux whatever its libc.
#   gnu: dynamically linked against the build machine's glibc (Debian 12: needs glibc >= 2.34).
set -euo pipefail
cd "$(dirname "$0")/.."
libc=${1:-musl}
target=aarch64-unknown-linux-$libc
profile=${PROFILE:-release}
cargo build --profile "$profile" --locked --target "$target" -p flightnode-agent
bin=target/$target/$profile/flightnode-agent
size=$(stat -c %s "$bin")
awk -v b="$bin" -v s="$size" 'BEGIN { printf "%s\t%d bytes (%.2f MiB)\n", b, s, s / 1048576 }'
