#!/usr/bin/env bash
# A release's artifacts, all static (musl) so no board or container needs a particular libc:
#   dist/flightnode-agent-<version>-aarch64   the boards (Raspberry Pi, Jetson, i.MX8, RK3588, ...)
#   dist/flightnode-agent-<version>-x86_64    x86_64 companion computers
#   dist/flightnode-agent_<version>-1_arm64.deb, ..._amd64.deb   the same binaries as Debian packages
#   dist/flightnode-hub-<version>-x86_64      the hub, also what hub/Containerfile packs
#   dist/kubectl-flightnode-<version>-x86_64  the kubectl plugin (runs the hub beside it), also in the image
#   dist/flightnode-hub_<version>-1_amd64.deb the hub, the plugin and hub/deploy/ as a Debian package
# Needs: rustup target add aarch64-unknown-linux-musl x86_64-unknown-linux-musl;
#        apt-get install gcc-aarch64-linux-gnu binutils-aarch64-linux-gnu musl-tools;
#        cargo install --locked cargo-deb --version 3.8.0.  ./test.sh installs all of them.
# Usage: cross/release.sh [OUT_DIR]   (default dist/)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-dist}
mkdir -p "$out"
version=$(cargo pkgid -p flightnode-agent | sed 's/.*[#@]//')
for target in aarch64-unknown-linux-musl x86_64-unknown-linux-musl; do
    arch=${target%%-*}
    # One build per package: cargo unifies features across the packages of one build, and the
    # agent must not carry what the hub's dependencies turn on.
    cargo build --release --locked --target "$target" -p flightnode-agent
    [[ $arch == x86_64 ]] && cargo build --release --locked --target "$target" -p flightnode-hub
    cp "target/$target/release/flightnode-agent" "$out/flightnode-agent-$version-$arch"
    [[ $arch == x86_64 ]] && cp "target/$target/release/flightnode-hub" "$out/flightnode-hub-$version-$arch"
    # The release profile already strips; cargo-deb's strip would need the cross binutils.
    deb=$(cargo deb --locked --no-build --no-strip -p flightnode-agent --target "$target" --output "$out" | tail -n1)
    agent/debian/add-md5sums.sh "$deb"
    if [[ $arch == x86_64 ]]; then
        cp "target/$target/release/kubectl-flightnode" "$out/kubectl-flightnode-$version-$arch"
        deb=$(cargo deb --locked --no-build --no-strip -p flightnode-hub --target "$target" --output "$out" | tail -n1)
        agent/debian/add-md5sums.sh "$deb"
    fi
done
(cd "$out" && ls -l && sha256sum -- * > SHA256SUMS)
